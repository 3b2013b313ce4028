"""WeightWatcher 0.7.7's call shape, computed by spectral_ext: change

    import weightwatcher as ww            ->  from spectral_ext.compat import weightwatcher as ww
    ww.WeightWatcher(model=m).analyze()

and get the same DataFrame (columns, layer ids, conventions) faster. Every
formula follows WeightWatcher 0.7.7's source (weightwatcher.py, RMT_Util.py,
WW_powerlaw.py), read line by line:

- layers of a module: model.named_modules() in order, ids from 0 (the model
  itself is 0); a module is "dense" (Linear), "conv2d", "conv1d" or
  "embedding" by WeightWatcher's type test; weights go through float32 as in
  its torch_T_to_np. A Conv2d is its kh*kw slices W[:, :, i, j], each
  transposed to N x M (N >= M) when out < in, with WeightWatcher's running
  swap of N and M per transposed slice (so a kernel with an even number of
  taps and out < in keeps N < M, as there); rf = kh*kw. transformers' Conv1D
  (GPT-2's c_attn, c_proj, c_fc: a 2-d (in, out) weight) is a "conv1d"
  layer analysed as its matrix, as there.
- a state_dict (ids from 1) or a Hugging Face folder (model="path", as
  WeightWatcher's PyStateDictDir reads it: model*.safetensors first, then
  adapter_model*.safetensors, pytorch_model*.bin, adapter_model*.bin): every
  key ending in ".weight" takes an id (norm scales too), in the order of a
  *layer_map file or of the shard index (shard files sorted, keys in the
  index's order within each), else file by file in sorted order with each
  file's keys sorted (a .bin: its state_dict's order) and WeightWatcher's ids
  per file (each file starts at the previous file's start plus every layer
  so far); a layer is named by its key less ".weight", 2-d weights (embeddings
  and heads included) are "dense", 4-d ones "conv2d", others none. Shapes
  come from the files' headers; the tensors are read through
  spectral_ext.weights, memory-mapped, one at a time when analysed (describe
  reads none), bf16 and fp16 converted exactly as WeightWatcher's float32
  copy converts them.
- layers pass when M*rf (M for a Linear) is within [min_evals, max_evals]
  and N <= max_N; layers may be filtered by id (all positive to keep, all
  negative to skip), name (or "-name") or type. The layers WeightWatcher
  leaves out for their size (N > max_N, M*rf > max_evals: a 151,936 x 896
  embedding) are left out here too, named in a LayersLeftOutWarning;
  large_layers=True analyses them as well (the Gram of the smaller side makes
  them cheap).
- conv2d_norm: each Conv2d slice is scaled by sqrt(conv2d_count / 2) =
  sqrt(1/2) when pooling; no 1/N normalisation. get_ESD returns the
  unscaled eigenvalues, as WeightWatcher's get_ESD skips the scaling.
- ESD: the pooled squared singular values of the slices (float64 Gram of
  the smaller side + eigvalsh: spectral_ext.spectra.weight_singular_values'
  route), small slices batched by shape across layers, every larger layer
  read, computed and freed in turn.
- the power-law fit is WWFit (spectra.fit_power_law(convention=
  WEIGHTWATCHER), the convention object below): eigenvalues above 1e-5,
  every point but the last as xmin, one-sided KS distance D, sigma = (alpha - 1) / sqrt(n_tail); below
  20 eigenvalues the bias-corrected alpha over tails of at least 8.
- columns: has_esd, num_evals, sv_max, sv_min (WeightWatcher's running
  maximum of each slice's smallest singular value), rank_loss (per slice,
  numpy's matrix_rank tolerance with N), weak_rank_loss (eigenvalues below
  tolerance), lambda_max, alpha, xmin, xmax, D, sigma, num_pl_spikes, status,
  warning (alpha < 2 "over-trained", > 6 "under-trained"), norm, log_norm,
  spectral_norm (= lambda_max), log_spectral_norm, alpha_weighted = alpha *
  log10(lambda_max), log_alpha_norm = log10(sum lambda^alpha), stable_rank =
  norm / lambda_max, matrix_rank, entropy; with mp_fit: num_spikes, sigma_mp,
  mp_softrank, W_scale, bulk_max, bulk_min (the same brute-force sigma search
  over the same linear-kernel density, estimated once per layer instead of
  once per trial sigma); with randomize: max_rand_eval, rand_distance,
  ww_softrank, ww_maxdist and the rand_* MP columns, shuffling each slice
  with numpy's global generator in WeightWatcher's order (np.random.seed(s)
  before either tool gives both the same numbers).

What WeightWatcher.valid_params refuses (min_evals >= max_evals, max_N
below either, savefig neither a bool nor a str, an unknown fit, conv2d_fft
with pool=False or intra, start_ids < 0, ...) raises InvalidParamsError, a
ValueError whose message opens as WeightWatcher's bare Exception's ("Error,
params not valid"), before any of the refusals below; ww2x=True means
pool=False, as there.

pool=False (or ww2x=True): WeightWatcher's WW2xSliceIterator, a row per
kh*kw slice of a Conv2d (slice_id; 0 for a matrix), each slice scaled by
sqrt(rf / 2) (conv2d_count / 2 there), layers kept by M alone against
min_evals / max_evals; the slices' spectra are computed in one batch per layer.

fix_fingers="clip_xmax" (fit="PL", either pl_package): RMT_Util.fit_clipped_powerlaw,
power laws refitted with the largest 2, 3, ... eigenvalues left out until alpha
drops by finger_thresh (num_fingers and raw_alpha columns, as there).
detX=True: apply_detX's columns (detX_num, num_ERG_spikes, ERG_gap, detX_val,
detX_val_unrescaled).

pl_package="powerlaw" (fit="PL", "TPL" or "E_TPL", xmax=None or "force",
fix_fingers="xmin_peak"): WeightWatcher.fit_powerlaw's calls of the powerlaw
package, layer by layer (a Lambda column for TPL fits), on spectral_ext's
spectrum; the same eigenvalues give the same fit to the last bit, but where a
TPL fit's alpha sits at its bound (0) powerlaw's optimiser turns the spectra's
1e-15 differences into Lambda and D differences up to 1e-2. WeightWatcher 0.7.7
also passes powerlaw.Fit distribution=, which powerlaw 2.0 refuses (there
every such fit fails); the adapter leaves it out, as powerlaw 1.x ignored it.

distances(model_1, model_2, method="raw"|"euclidean"|"cka", layers, start_ids,
pool): WeightWatcher's frame and means, float32 norms as there.
SVDSmoothing (method "detX", "svd", "alpha_min", "rmt", "auto") and
SVDSharpness, on a module or a state_dict: a changed deep copy is returned
and watched (self.model); the model given is never changed (WeightWatcher
changes it in place). A model folder is refused (WeightWatcher logs an error
per layer and leaves it as it is). Dropping the top singular values agrees
with WeightWatcher to float32 rounding; keeping the top k reproduces its
randomized TruncatedSVD estimate in float64 (to 1e-5 - 4e-5), truncation="exact"
gives the exact rank-k truncation (6e-2 - 3e-1 from that estimate on flat
random spectra).

intra=True (WeightWatcher's WWIntraLayerIterator): consecutive kept layers
paired (W0, W1: their first matrices, a Conv2d's first kh*kw slice, aligned
on a shared dimension as its align_mats does; pairs that do not chain give
no row), X = W0 W1 / (||W0|| ||W1||) in float32 as there, or with sparsify
(its default) W0 S W1 / (||W0|| ||W1|| + sqrt(||S||)) with S drawn by
np.random.randint(2) from numpy's global generator in its order; the row is
the later layer's (id, longname, type, rf), named "<id0> X <id1> ", N and M
of X, X scaled by sqrt(1/2) after a Conv2d, an Xflag column; its ESD is X's
singular values themselves (not squared, as its combined_eigenvalues does),
the later layer's num_components of them (the largest: ARPACK there). With
randomize, vectors or conv2d_fft it is refused as there, and so is
describe(intra=True) (WeightWatcher's describe keeps DEFAULT_PARAMS'
randomize=True). peft=True (WWPeftLayerIterator) on a module laid out as
PEFT lays it out or an adapter folder: each "dense" layer named lora_A and
the lora_B after it become one row, BA = np.dot(B, A) in float32, unscaled
(WeightWatcher ignores lora_alpha / r), named lora_BA, its ESD the r largest
squared singular values (r = min(A.shape)); the other layers give no row.
peft="with_base" keeps the other layers' rows and adds W + BA (W the last
non-LoRA layer's matrix, named lora_W_plus_AB, r values too) before BA's
row; a peft column. LoRA layers go through analyze's filters and size tests
first, as there (r < min_evals leaves both out). base_model (to the
constructor, or to analyze / describe with the model, as set_model_ takes
it; WWDeltaLayerIterator): the model's kept layers in order, each less (in
float32) the base's next kept layer when its name is held in that layer's
name; describe gives the model's rows.

Not reproduced (a ValueError names the argument): glorot_fix, conv2d_fft, fft, stacked, vectors,
fix_fingers="clip_xmax" with fit="TPL", an int xmax, deltas, ERG, randomize with peft, base_model
with pool=False, intra or peft, or with layers of other shapes; folders of WeightWatcher's .npy flat
files or Keras .h5 files; a single checkpoint file as model (WeightWatcher takes folders).
nn.Conv1d layers (3-d weights), on which WeightWatcher 0.7.7's SVD fails,
are left out with a warning (so is any other layer whose weight is no
matrix: a "dense" layer's not 2-d, a "conv2d" one's not 4-d). plot=True draws one ESD figure per
layer (spectral_ext.plot.esd) rather than WeightWatcher's five."""
from __future__ import annotations

import copy
import functools
import glob
import json
import math
import numbers
import os
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import spectra, weights
from .._linalg import _eigvalsh, _matmul, gram_singular_values

__version__ = "0.7.7"  # the WeightWatcher release whose conventions this reproduces

# WeightWatcher 0.7.7's constants (constants.py EVALS_THRESH, WW_powerlaw.py SMALL_N_CUTOFF and k_min).
EVALS_THRESH = 1e-5
SMALL_N = 20
SMALL_N_MIN_TAIL = 8
# WeightWatcher's spectra and WWFit as a spectra.PowerLawConvention (convention="weightwatcher" names it): a
# Conv2d as its kh*kw slices scaled by conv2d_norm sqrt(conv2d_count / 2) = sqrt(1/2) when pooling, only Linear
# and Conv2d analysed; eigenvalues above EVALS_THRESH, every point but the last as xmin, the one-sided KS distance,
# the bias-corrected alpha below SMALL_N values and WWFit's fallbacks; alpha-hat the mean alpha_weighted.
WEIGHTWATCHER = spectra.PowerLawConvention(
    "weightwatcher", "WeightWatcher", kernel_slices=True, slice_scale=math.sqrt(0.5), grouped_blocks=False,
    kinds=("linear", "conv2d"), evals_thresh=EVALS_THRESH, fixed_xmin=False, xmin_tail=2, distinct_xmin=False,
    finite_alpha=False, flat_tail_rtol=None, small_n=SMALL_N, small_n_min_tail=SMALL_N_MIN_TAIL, fallback=True,
    two_sided_ks=False, failed_status="failed", alpha_hat_log=np.log10, alpha_hat_mean=True)

DEFAULT_MIN_EVALS = 8
DEFAULT_MAX_EVALS = 15000
DEFAULT_MAX_N = 50000
DEFAULT_MAX_FINGERS, DEFAULT_FINGER_THRESH = 10, 1.0
WEAK_RANK_LOSS_TOLERANCE = 1e-6
EPSILON = 1e-10  # RMT_Util.matrix_entropy's guard
OVER_TRAINED_THRESH, UNDER_TRAINED_THRESH = 2.0, 6.0
LAYER_TYPES = ("dense", "conv1d", "conv2d", "embedding", "norm")
SUMMARY_METRICS = ("log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm", "stable_rank",
                   "mp_softrank")
_UNSUPPORTED = {"glorot_fix": False, "conv2d_fft": False, "fft": False, "stacked": False, "vectors": False,
                "fix_fingers": False, "xmax": None, "deltas": False, "ERG": False, "pl_package": "ww",
                "fit": "PL", "ww2x": False, "channels": None, "inverse": False}


def _layer_type(module: nn.Module) -> str:
    """WeightWatcher's PyTorchLayer.layer_type: isinstance or a substring of the class name."""
    name = str(type(module)).lower()
    if isinstance(module, nn.Linear) or "linear" in name:
        return "dense"
    if isinstance(module, nn.Conv1d) or "conv1d" in name:
        return "conv1d"
    if isinstance(module, nn.Conv2d) or "conv2d" in name:
        return "conv2d"
    if isinstance(module, nn.Embedding) or "embedding" in name:
        return "embedding"
    if "norm" in name:
        return "norm"
    return "unknown"


class _Layer:
    """One weight layer as WeightWatcher's WWLayer holds it: its id, names,
    type and (N, M, rf) from the weight's shape alone; the weight itself is
    read when `slices` is asked for (a file's tensor one at a time), as float64
    values of WeightWatcher's float32 copy (torch_T_to_np)."""

    def __init__(self, layer_id, name, longname, kind, shape, load):
        self.layer_id, self.name, self.longname, self.kind = layer_id, name, longname, kind
        self.shape, self._load = tuple(int(d) for d in shape), load
        if kind == "conv2d":
            out, cin, kh, kw = self.shape
            self.rf = kh * kw
            self.transpose = out < cin
            N, M = out, cin
            if self.transpose and self.rf % 2 == 1:  # conv2D_Wmats swaps N and M once per transposed slice
                N, M = M, N
        else:
            N, M = max(self.shape), min(self.shape)
            self.rf = 1
        self.N, self.M = int(N), int(M)
        self.norm = 1.0
        self.slice_id = None  # pool=False: the one kh*kw slice this row stands for

    def slice_copy(self, slice_id: int) -> "_Layer":
        """The layer as WeightWatcher's WW2xSliceIterator yields it for pool=False:
        the same N, M and rf, one slice (slice_id; 0 for a matrix)."""
        twin = copy.copy(self)
        twin.slice_id = slice_id
        return twin

    @property
    def slice_numel(self) -> int:
        return math.prod(self.shape[:2])

    @property
    def slices(self) -> torch.Tensor:
        return self.read()

    def matrix(self) -> torch.Tensor:
        """A 2-d weight as stored (its dtype, its layout), read now."""
        return self._load().reshape(self.shape)

    def read_float32(self) -> np.ndarray:
        """The weight as WeightWatcher's torch_T_to_np gives it: a float32
        numpy array in its stored shape and layout (a view of a float32
        module's weight)."""
        return self._load().to("cpu").float().numpy().reshape(self.shape)

    def read(self, scratch: "_Scratch | None" = None) -> torch.Tensor:
        """The (rf, rows, cols) float64 stack WeightWatcher's SVDs see (its
        N x M orientation for a Conv2d's slices, the weight as stored
        otherwise), with the values of its float32 copy (bf16, fp16 and fp32
        convert exactly; float64 and others go through float32 as there);
        in `scratch`'s reused memory when given."""
        w = self._load()
        if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            w = w.float()
        w = scratch(w.numel()).view(w.shape).copy_(w) if scratch is not None else w.to(torch.float64)
        if self.kind == "conv2d":
            out, cin, kh, kw = self.shape
            slices = w.reshape(self.shape).permute(2, 3, 0, 1).reshape(self.rf, out, cin)
            slices = slices.mT if self.transpose else slices  # the N x M orientation its shuffles use
        else:
            slices = w.reshape(self.shape)[None]
        return slices if self.slice_id is None else slices[self.slice_id:self.slice_id + 1]


def _matrix_rank(sv: np.ndarray, N: int) -> int:
    """RMT_Util.matrix_rank: numpy's default tolerance with N."""
    return int(np.count_nonzero(sv > np.max(sv) * N * np.finfo(sv.dtype).eps))


def _singular_values(matrices: list[torch.Tensor], scales=None) -> list[np.ndarray]:
    """Singular values of each (S, r, c) stack (times its scale): one Gram +
    eigvalsh call per stack; stacks of one shape go together only when
    small (LAPACK loops over a batch anyway, and joining large stacks would
    copy them)."""
    scales = [1.0] * len(matrices) if scales is None else scales
    groups: dict = {}
    for k, m in enumerate(matrices):
        small = m[0].numel() <= 4096
        groups.setdefault((tuple(m.shape[1:]), k if not small else -1), []).append(k)
    out = [None] * len(matrices)
    for keys in groups.values():
        stacked = matrices[keys[0]] if len(keys) == 1 else torch.cat([matrices[k] for k in keys])
        sv = gram_singular_values(stacked).numpy()
        start = 0
        for k in keys:
            out[k] = sv[start:start + len(matrices[k])] * scales[k]
            start += len(matrices[k])
    return out


class _Scratch:
    """float64 memory reused from layer to layer: a fresh buffer per layer
    is fresh pages to fault in (30 ms of a 4864 x 896 bf16 -> float64
    conversion, against 3 ms into memory already touched)."""

    def __init__(self):
        self.data = None

    def __call__(self, n: int) -> torch.Tensor:
        if self.data is None or self.data.numel() < n:
            self.data = None
            self.data = torch.empty(n, dtype=torch.float64)
        return self.data[:n]


_BLOCK = 1 << 23  # float64 entries of a weight converted at a time (64 MiB)


def _matrix_singular_values(w: torch.Tensor, scratch: _Scratch) -> np.ndarray:
    """(1, k) singular values (decreasing) of one matrix as stored (any
    float dtype): the eigenvalues of its smaller Gram, summed over blocks of
    the longer side converted to float64 (through float32 as
    torch_T_to_np) _BLOCK entries at a time, so that a 151,936 x 896 bf16
    embedding costs 64 MiB beyond itself, never its float64 copy. Each
    block's Gram is one A A^T, which _matmul hands to numpy where OpenBLAS
    is the faster BLAS (non-Intel CPUs; torch's product elsewhere), whose
    syrk computes one triangle (half the flops) and mirrors it: 77 ms
    against 94 ms for row panels of a 4864 x 896 layer, one thread, and the
    Qwen2-0.5B-shaped folder 11% faster."""
    tall = w.shape[0] >= w.shape[1]
    n, m = (w.shape[0], w.shape[1]) if tall else (w.shape[1], w.shape[0])
    G = torch.zeros(m, m, dtype=torch.float64)
    step = max(1, _BLOCK // max(m, 1))
    for s0 in range(0, n, step):
        part = w[s0:s0 + step] if tall else w[:, s0:s0 + step]
        if part.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            part = part.float()
        block = scratch(part.numel()).view(part.shape).copy_(part)
        A = block.mT if tall else block  # (m, b): the Gram is A A^T summed over blocks
        G += _matmul(A, A.mT)
        del part, block, A
    return _eigvalsh(G).flip(-1).clamp_min(0).sqrt().numpy()[None]


def _layer_singular_values(chosen: list[_Layer]) -> list[np.ndarray]:
    """Each layer's singular values (rf, k), scaled by its norm: the small
    layers (slices of at most 4096 entries) read together and batched by
    shape, every other layer read into one reused buffer, computed and
    dropped in turn (a folder is never in memory at once)."""
    out = [None] * len(chosen)
    small = [k for k, layer in enumerate(chosen) if layer.slice_numel <= 4096]
    if small:
        svs = _singular_values([chosen[k].slices for k in small], [chosen[k].norm for k in small])
        for k, sv in zip(small, svs):
            out[k] = sv
    scratch = _Scratch()
    for k, layer in enumerate(chosen):
        if out[k] is None:
            if layer.kind == "conv2d":
                slices = layer.read(scratch)
                out[k] = _singular_values([slices], [layer.norm])[0]
                del slices
            else:
                out[k] = _matrix_singular_values(layer.matrix(), scratch) * layer.norm
    scratch.data = None
    weights.release_freed_memory()
    return out


def _mp_fit(evals: np.ndarray, N: int, M: int) -> tuple:
    """WeightWatcher.mp_fit without plots: rescale the ESD to unit mean
    (W_scale), brute-force the Marchenko-Pastur (or, for Q = 1,
    quarter-circle) sigma against a linear-kernel density of bandwidth 0.1
    (RMT_Util.fit_density_with_range and resid_mp, the density estimated
    once), then the bulk edges, spikes above bulk_max + sqrt(TW) and
    mp_softrank = bulk_max / lambda_max."""
    from scipy import optimize
    from sklearn.neighbors import KernelDensity

    Q = N / M
    Wscale = np.sqrt(evals.shape[0]) / np.sqrt(np.sum(evals))
    to_plot = (Wscale * Wscale) * evals
    lambda_max = np.max(to_plot)
    to_fit = np.sqrt(to_plot) if Q == 1 else to_plot
    kde = KernelDensity(kernel="linear", bandwidth=0.1).fit(to_fit.reshape(-1, 1))
    xde = np.linspace(0, np.max(to_fit) + 0.5, 1000)
    with np.errstate(divide="ignore"):
        yde = np.exp(kde.score_samples(xde[:, None]))
    good = yde > 0.01
    xde, yde = xde[good], yde[good]
    peak = xde[np.where(yde == max(yde))][0]

    def residual(sigma):
        with np.errstate(divide="ignore", invalid="ignore"):
            if Q == 1:
                ymp = np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - xde ** 2))
                return np.sum((ymp - yde) ** 2)
            b = np.power(sigma * (1 + np.sqrt(1 / Q)), 2)
            a = np.power(sigma * (1 - np.sqrt(1 / Q)), 2)
            ymp = np.nan_to_num((1 / (2 * np.pi * sigma * sigma * xde * (1 / Q))) * np.sqrt((b - xde) * (xde - a)))
        if (b < peak) | (b > max(xde)) | (a > peak):
            return np.sum((np.zeros(len(yde)) + 1000) ** 2)
        return np.sum((ymp - yde) ** 2)

    scale = np.sqrt(np.max(to_plot) / np.square(1.0 + 1.0 / np.sqrt(Q)))  # RMT_Util.calc_sigma
    grid = (slice(0.05 * scale, 2.0 * scale, 0.01 * scale),)
    s1 = optimize.brute(residual, grid, full_output=True)[0][0]
    bulk_max = (s1 * (1 + 1 / np.sqrt(Q))) ** 2
    bulk_min = (s1 * (1 - 1 / np.sqrt(Q))) ** 2
    TW = 1 / np.sqrt(Q) * np.power(bulk_max, 2 / 3) * np.power(M, -2 / 3)
    num_spikes = len(to_plot[to_plot > bulk_max + np.sqrt(TW)])
    mp_softrank = bulk_max / lambda_max
    return num_spikes, s1, mp_softrank, bulk_min / (Wscale * Wscale), bulk_max / (Wscale * Wscale), Wscale


class LayersLeftOutWarning(UserWarning):
    """WeightWatcher 0.7.7 leaves layers out for their size (N > max_N or
    M * rf > max_evals) without a word; the adapter keeps its rows and names
    them in this warning (large_layers=True analyses them too)."""


def _module_candidates(model: nn.Module, start_ids: int):
    """(layer_id, name, longname, kind, shape, loader) of each weight layer of
    a module in named_modules() order, ids from start_ids; layers whose
    weight is not a matrix (nn.Conv1d's 3-d weight; a Conv2d's must be 4-d),
    on which WeightWatcher's SVD fails, are listed apart with their kind."""
    out, odd = [], []
    for layer_id, (longname, module) in enumerate(model.named_modules(), start=start_ids):
        kind = _layer_type(module)
        weight = getattr(module, "weight", None)
        if kind in ("unknown", "norm") or not isinstance(weight, torch.Tensor):
            continue
        name = longname.split(".")[-1] if longname else type(module).__name__
        if weight.dim() != (4 if kind == "conv2d" else 2):  # nn.Conv1d; transformers' Conv1D is 2-d (in, out)
            odd.append((layer_id, name, longname or name, kind, weight.dim()))
            continue

        def load(module=module):  # WeightWatcher reads weights through float32 on the CPU (_Layer.read)
            return module.weight.detach().cpu()

        out.append((layer_id, name, longname or name, kind, tuple(weight.shape), load))
    return out, odd


def _stored_kind(shape) -> str:
    """PyStateDictLayer.layer_type: 2-d "dense", 4-d "conv2d", else (or a
    first dimension below 2) "unknown"."""
    if len(shape) == 0 or shape[0] < 2:
        return "unknown"
    return {2: "dense", 4: "conv2d"}.get(len(shape), "unknown")


def _entry_loader(entry):
    """The stored tensor of a weights.WeightTensor (read when called; _Layer.read converts it)."""
    return entry.load


def _entry_shape(entry) -> tuple:
    """The stored shape of a WeightTensor (out, in, *kernel) or (rows, cols)."""
    if entry.kernel:
        return (entry.shape[0], entry.shape[1] // math.prod(entry.kernel), *entry.kernel)
    return tuple(entry.shape)


def _state_candidates(keys, entries: dict, start_id: int):
    """WeightWatcher's PyStateDictLayer iterator over `keys` (in its order): a
    layer id for every key ending in ".weight" (norm scales included), named
    by the key less ".weight"; 2-d weights "dense", 4-d "conv2d"."""
    if not any(key.endswith(".weight") for key in keys):
        keys = [f"{key}.weight" for key in keys]
    out, layer_id = [], start_id
    for key in keys:
        if not key.endswith(".weight"):
            continue
        entry, name = entries.get(key), key[:-len(".weight")]
        layer_id += 1
        if entry is None or entry.kind in ("vector", "other"):
            continue
        shape = _entry_shape(entry)
        kind = _stored_kind(shape)
        if kind == "unknown":
            continue
        if entry.load is None:
            warnings.warn(f"{entry.source} is left out: {entry.note}", stacklevel=4)
            continue
        out.append((layer_id - 1, name, name, kind, shape, _entry_loader(entry)))
    return out


def _model_file_format(folder: str):
    """WeightWatcher.infer_model_file_format: ("safetensors" | "pytorch", glob) or (None, None)."""
    for fmt, pattern in (("safetensors", "model*safetensors"), ("safetensors", "adapter_model*safetensors"),
                         ("pytorch", "pytorch_model*bin"), ("pytorch", "adapter_model*bin")):
        fileglob = f"{folder}/{pattern}"
        if glob.glob(fileglob):
            return fmt, fileglob
    return None, None


def _layer_map(fileglob: str) -> list:
    """PyStateDictDir.get_layer_map: the lines of a *layer_map file, else the
    keys of the shard index grouped by file (files in sorted order, keys in
    the index's order), else []."""
    maps = glob.glob(fileglob.replace("safetensors", "layer_map"))
    indexes = glob.glob(fileglob.replace("safetensors", ".safetensors.index.json"))
    if len(maps) == 1:
        with open(maps[0]) as handle:
            return [line.strip() for line in handle]
    if len(indexes) == 1:
        with open(indexes[0]) as handle:
            weight_map = json.load(handle)["weight_map"]
        return [k for file in np.unique(list(weight_map.values())) for k, v in weight_map.items() if v == file]
    return []


def _keyed(path: str) -> dict:
    """key -> WeightTensor of one checkpoint file (spectral_ext.weights:
    memory-mapped, each tensor read when loaded)."""
    return {entry.source[len(path) + 1:]: entry for entry in weights.read_path(path)}


def _folder_candidates(folder: str, start_id: int, layer_map: list | None = None):
    """PyStateDictDir's layers of a Hugging Face folder, in its order and
    with its ids: safetensors with a layer map or shard index: the map's keys
    (looked up over every *model*safetensors file); safetensors without one and
    pytorch_model*.bin: file by file in sorted order, each file's keys in
    their order (safetensors: sorted), each file's ids starting where
    WeightWatcher starts them (the previous file's start plus every layer
    yielded so far). layer_map (a base model's folder: the model's kept
    layer names, as WWDeltaLayerIterator hands them over) replaces the
    folder's own map for safetensors, numbered from start_id; a name the
    folder lacks raises (WeightWatcher fails with a KeyError there)."""
    fmt, fileglob = _model_file_format(folder)
    if fmt is None:
        raise ValueError(f"model folder {folder}: no model*.safetensors, adapter_model*.safetensors, "
                         "pytorch_model*.bin or adapter_model*.bin (WeightWatcher's folder formats)")
    given = bool(layer_map)
    layer_map = (layer_map if given else _layer_map(fileglob)) if fmt == "safetensors" else []
    if layer_map:
        entries: dict = {}
        for path in sorted(glob.glob(f"{folder}/*model*safetensors")):
            for key, entry in _keyed(path).items():
                entries.setdefault(key, entry)
        if given:
            missing = [name for name in layer_map if f"{name}.weight" not in entries and name not in entries]
            if missing:
                raise ValueError(f"base_model: the folder {folder} has no tensor {missing[0]}.weight (of "
                                 f"{len(missing)} layer(s) of the model missing there: {missing[:5]})")
        return _state_candidates(layer_map, entries, start_id)
    out, start, yielded = [], start_id, 0
    for path in sorted(glob.glob(fileglob)):
        entries = _keyed(path)
        keys = _safetensors_keys(path) if fmt == "safetensors" else list(entries)
        start += yielded
        n_weights = sum(k.endswith(".weight") for k in keys) if any(k.endswith(".weight") for k in keys) \
            else len(keys)
        out.extend(_state_candidates(keys, entries, start))
        yielded += n_weights
    return out


def _safetensors_keys(path: str) -> list:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return list(handle.keys())  # sorted by name, as SafeTensorDict lists them


# -- intra=True and peft=True: WeightWatcher's WWIntraLayerIterator and WWPeftLayerIterator ---------------------


def _wmat(layer: _Layer) -> np.ndarray:
    """The layer's first weight matrix as WeightWatcher 0.7.7's iterators hold
    it (WWLayer.Wmats[0]): the float32 numpy copy torch_T_to_np makes of the
    weight, a Conv2d's first kh*kw slice W[:, :, 0, 0], transposed when
    out < in (conv2D_Wmats); the same array layout, so that numpy's float32
    products give WeightWatcher's bits."""
    return _wmats(layer.read_float32(), layer)[0]


def _wmat_shape(layer: _Layer) -> tuple:
    """_wmat's shape without reading the weight."""
    if layer.kind == "conv2d":
        out, cin = layer.shape[:2]
        return (cin, out) if out < cin else (out, cin)
    return tuple(layer.shape)


def _align_mats(W0: np.ndarray, W1: np.ndarray):
    """WWIntraLayerIterator's align_mats: when the four dimensions repeat, the
    largest repeated one is the shared one, and W0 (W1) is transposed unless
    its columns (rows) are it; otherwise both unchanged."""
    shapes = [W0.shape[0], W0.shape[1], W1.shape[0], W1.shape[1]]
    for x in np.unique(shapes):
        shapes.remove(x)
    if shapes:
        shared = np.max(shapes)
        if not shared:
            return W0, W1
        if W0.shape[1] != shared:
            W0 = np.transpose(W0)
        if W1.shape[0] != shared:
            W1 = np.transpose(W1)
    return W0, W1


def _n_comp(layer: _Layer) -> int:
    """WWLayer.num_components: M, or M * rf for a Conv2d."""
    return layer.M * layer.rf if layer.kind == "conv2d" else layer.M


def _top_singular_values(X: np.ndarray, n_comp: int, rowspace: np.ndarray | None = None) -> np.ndarray:
    """combined_eigenvalues' singular values of one float64 matrix, ascending:
    all of them through WeightWatcher's own call (scipy.linalg.svd, values
    only: the same bits, which its MP fit's brute-force search needs, as it
    can turn a 1e-14 difference into another grid point), or the n_comp
    largest when n_comp < min(X.shape) (ARPACK's svds there, started from a
    fresh random vector per call, so that WeightWatcher itself differs from
    run to run in singular values at rounding level): the full SVD's largest
    here, or, for a LoRA product X = B A given A's rows as `rowspace`, the
    singular values of X Q, Q an orthonormal basis of A's rows (X's rank-r
    part exactly, its float32 rounding to second order: 1e-14 relative)."""
    from scipy import linalg

    X = np.asarray(X, dtype=np.float64)
    if rowspace is not None and n_comp < min(X.shape):
        Q = torch.linalg.qr(torch.from_numpy(np.asarray(rowspace, dtype=np.float64)).mT).Q
        sv = torch.linalg.svdvals(torch.from_numpy(X) @ Q).numpy()
    else:
        sv = linalg.svd(X, compute_uv=False)
    return np.sort(sv)[-n_comp:]


def _renamed(layer: _Layer, old: str, new: str, N: int, M: int) -> _Layer:
    twin = copy.copy(layer)
    twin.name, twin.longname = layer.name.replace(old, new), layer.longname.replace(old, new)
    twin.N, twin.M, twin.norm = int(N), int(M), 1.0
    return twin


def _intra_layers(chosen, sparsify: bool, conv2d_norm: bool):
    """WWIntraLayerIterator (intra=True): each layer kept (by analyze's
    filters and size tests) with the one before it, W0 and W1 their first
    weight matrices (_wmat) aligned by _align_mats; a pair whose W0 columns
    are not W1's rows is skipped (and the pair after starts from W1). X =
    W0 W1 / (||W0|| ||W1||) in float32 (numpy, as there); with sparsify (its
    default) X = W0 S W1 / (||W0|| ||W1|| + sqrt(||S||)), S a 0/1 matrix of
    np.random.randint(2) (numpy's global generator, in its order). X is the
    later layer's row: its id, longname, type and rf, named "<id0> X <id1> "
    (trailing space), N and M of X, scaled by sqrt(1/2) (conv2d_norm) when
    that layer is a Conv2d. Yields (layer, X float64, n_comp)."""
    prev = prev_W = None
    for layer in chosen:
        W = _wmat(layer)
        if prev is None:
            prev, prev_W = layer, W
            continue
        W0, W1 = _align_mats(prev_W, W)
        name = f"{prev.layer_id} X {layer.layer_id} "
        prev, prev_W = layer, W
        if W0.shape[1] != W1.shape[0]:
            continue
        norm12 = np.linalg.norm(W0) * np.linalg.norm(W1)
        if sparsify:
            M = np.min(W1.shape[0])
            S = np.random.randint(2, size=M * M).reshape((M, M))
            norm12 = norm12 + np.sqrt(np.linalg.norm(S))
            X = np.dot(np.dot(W0, S), W1) / norm12
        else:
            X = np.dot(W0, W1) / norm12
        if conv2d_norm and layer.kind == "conv2d":
            X = X * np.sqrt(1 / 2.0)  # apply_normalize_Wmats with conv2d_count = 1
        twin = _renamed(layer, "", "", max(X.shape), min(X.shape))
        twin.name = name
        yield twin, X.astype(float), _n_comp(layer)


def _peft_layers(chosen, with_base: bool, compute: bool = True):
    """WWPeftLayerIterator (peft=True, or "with_base"): among the layers kept,
    a "dense" one whose longname holds "lora_A" is A, the next one holding
    "lora_B" is B; A becomes the row of BA = np.dot(B, A) in float32 (A
    transposed when taller than wide, B when its columns are not A's rows;
    no lora_alpha / r scaling, as there), named with "lora_BA" for "lora_A",
    its singular values the r = min(A.shape) largest (num_components). With
    "with_base", the other layers keep their rows (in order) and B becomes
    the row of W + BA (BA^T when A was transposed; W the last non-LoRA
    layer's first matrix), named "lora_W_plus_AB", also r singular values,
    given before BA's row. Other "lora_" layers are left out. Yields
    ("layer", layer) for a layer analysed as it is, ("matrix", layer, X,
    n_comp, rowspace) for BA and W + BA (X None when compute is False)."""
    last = None  # the last non-LoRA layer (with_base)
    stack, A_layer = [], None
    for layer in chosen:
        if layer.kind == "dense" and "lora_" in layer.longname:
            if "lora_A" in layer.longname:
                A_layer = layer
                stack.append(("layer", layer))
            elif "lora_B" in layer.longname:
                if A_layer is None or ("layer", A_layer) not in stack:
                    raise ValueError(f"peft: {layer.longname} (a lora_B layer) follows no lora_A layer of its own")
                a_shape, b_shape = _wmat_shape(A_layer), _wmat_shape(layer)
                transpose = a_shape[0] > a_shape[1]
                a_shape = a_shape[::-1] if transpose else a_shape
                b_t = b_shape[1] != a_shape[0]
                b_shape = b_shape[::-1] if b_t else b_shape
                if b_shape[1] != a_shape[0]:
                    raise ValueError(f"peft: LoRA matrices {A_layer.longname} and {layer.longname} can not be "
                                     f"aligned: B {b_shape} x A {a_shape} (WeightWatcher's np.dot fails too)")
                rank = min(a_shape)
                ba_shape = (b_shape[0], a_shape[1])
                A = B = BA = None
                if compute:
                    A, B = _wmat(A_layer), _wmat(layer)
                    A, B = (A.T if transpose else A), (B.T if b_t else B)
                    BA = np.dot(B, A)
                ba = _renamed(A_layer, "lora_A", "lora_BA", max(ba_shape), min(ba_shape))
                stack[stack.index(("layer", A_layer))] = ("matrix", ba, BA, rank, A)
                if with_base and last is not None:
                    w_shape = np.broadcast_shapes(_wmat_shape(last), ba_shape[::-1] if transpose else ba_shape)
                    W = None
                    if compute:
                        W = _wmat(last) + (BA.T if transpose else BA)
                    stack.append(("matrix", _renamed(layer, "lora_B", "lora_W_plus_AB", max(w_shape),
                                                     min(w_shape)), W, rank, None))
                while stack:
                    item = stack.pop()
                    yield item if item[0] == "layer" else item[:2] + (
                        None if item[2] is None else item[2].astype(float),) + item[3:]
                A_layer = None
        else:
            last = layer
            if with_base:
                yield ("layer", layer)


def _source_kind(model) -> str:
    if isinstance(model, nn.Module):
        return "module"
    if isinstance(model, Mapping):
        return "state_dict"
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        return "folder"
    if isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model: {os.fspath(model)!r} is not a folder (WeightWatcher reads a Hugging Face "
                         "model folder of safetensors or pytorch_model*.bin files)")
    raise TypeError(f"model must be a torch.nn.Module, a state_dict or a model folder, got {type(model).__name__}")


class WeightWatcher:
    """spectral_ext's drop-in for weightwatcher.WeightWatcher (0.7.7) on
    PyTorch models, state_dicts and Hugging Face model folders: analyze,
    describe, get_summary, get_details, get_ESD; SVDSmoothing and SVDSharpness
    on modules and state_dicts; distances on modules."""

    def __init__(self, model=None, framework=None, base_model=None, log_level=None):
        if model is not None:
            _source_kind(model)
        if base_model is not None:
            _source_kind(base_model)
        self.model, self.base_model, self.details, self.figures = model, base_model, None, {}

    def _base(self, model, base_model, chosen, layers, min_evals, max_evals, max_N, start_ids, large_layers):
        """WeightWatcher.set_model_'s base model (analyze's base_model is
        taken only when a model is given too and none was set before) and its
        layers as WWDeltaLayerIterator's right-hand iterator keeps them (the
        same filters and size tests); None without one. chosen: the model's
        kept layers. A folder base is read by their names in the model's
        order (its layer_map), numbered afresh from start_ids, and filtered
        again, as there: so layer ids in `layers` select other base layers,
        and the model's layers left unpaired are analysed as they are
        (WeightWatcher 0.7.7's behaviour; filter by name to pair them)."""
        if model is not None and self.base_model is None:
            self.base_model = base_model
        if self.base_model is None:
            return None
        kinds = (_source_kind(self._model(model)), _source_kind(self.base_model))
        if kinds[0] != kinds[1]:
            raise ValueError(f"base_model: a {kinds[1]} for a {kinds[0]} model (WeightWatcher stops on frameworks "
                             "that differ)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LayersLeftOutWarning)
            # WWDeltaLayerIterator's layer_map: only PyStateDictDir (a folder) reads it
            names = [layer.name for layer in chosen] if kinds[0] == "folder" else None
            return self._layers(self.base_model, layers, min_evals, max_evals, max_N, start_ids, large_layers,
                                layer_map=names)

    # -- layers ------------------------------------------------------------------------------

    def _model(self, model):
        model = model if model is not None else self.model
        if model is None:
            raise TypeError("model: pass a torch.nn.Module, a state_dict or a model folder")
        _source_kind(model)
        self.model = model
        return model

    @staticmethod
    def _filters(layers):
        if layers is None:
            layers = []
        if isinstance(layers, (numbers.Integral, str)):
            layers = [layers]
        ids = [int(f) for f in layers if isinstance(f, numbers.Integral) and not isinstance(f, bool)]
        types = [f for f in layers if isinstance(f, str) and f in LAYER_TYPES]
        names = [f for f in layers if isinstance(f, str) and f not in LAYER_TYPES]
        if len(ids) + len(types) + len(names) != len(layers):
            raise TypeError(f"layers must hold layer ids (int), names or types {LAYER_TYPES}, got {layers!r}")
        if ids and min(ids) < 0 < max(ids):
            raise ValueError(f"layers: ids must be all >= 0 (keep) or all < 0 (skip), got {ids}")
        if names and 0 < sum(n.startswith("-") for n in names) < len(names):
            raise ValueError("layers: names are either all to keep or all to skip ('-name')")
        return ids, types, names

    @staticmethod
    def _candidates(model, start_ids, layer_map=None):
        kind = _source_kind(model)
        if kind == "module":
            return _module_candidates(model, start_ids)
        if kind == "state_dict":
            state = model["state_dict"] if isinstance(model.get("state_dict"), Mapping) else model
            entries = {e.source: e for e in weights.read_weights(dict(state), name="model")}
            return _state_candidates(list(state), entries, start_ids or 1), []  # ids from 1 for a state_dict
        return _folder_candidates(os.fspath(model), start_ids, layer_map), []

    def _layers(self, model, layers, min_evals, max_evals, max_N, start_ids=0, large_layers=False, pool=True,
                layer_map=None):
        ids, types, names = self._filters(layers)

        def chosen(layer_id, name, kind):  # WWLayerIterator.apply_filters
            if types and kind not in types:
                return False
            if ids and ((min(ids) >= 0 and layer_id not in ids) or (min(ids) < 0 and -layer_id in ids)):
                return False
            return not (names and ((not names[0].startswith("-") and name not in names) or f"-{name}" in names))

        candidates, odd = self._candidates(model, start_ids, layer_map)
        kept, large = [], []
        for layer_id, name, longname, kind, shape, load in candidates:
            if not chosen(layer_id, name, kind):
                continue
            layer = _Layer(layer_id, name, longname, kind, shape, load)
            count = layer.M * layer.rf if pool else layer.M  # pool=False: each slice's M eigenvalues
            if min_evals and count < min_evals:  # WWLayerIterator.layer_supported
                continue
            if (max_evals and count > max_evals) or (max_N is not None and layer.N > max_N):
                large.append(layer)
                if not large_layers:
                    continue
            kept.append(layer)
        odd = [f"{longname} ({kind}, {dims}-d)" for layer_id, name, longname, kind, dims in odd
               if chosen(layer_id, name, kind)]
        if odd:
            warnings.warn(f"layers {odd} are left out: WeightWatcher 0.7.7's SVD fails on their weights (a Conv1d's "
                          "is 3-d), which are no matrices", stacklevel=3)
        if large and not large_layers:
            listed = ", ".join(f"{l.layer_id} {l.longname} (N={l.N}, M*rf={l.M * l.rf})" for l in large)
            warnings.warn(f"{len(large)} layer(s) left out, as WeightWatcher 0.7.7 leaves them out for their size "
                          f"(N > max_N={max_N} or M*rf > max_evals={max_evals}): {listed}; large_layers=True "
                          "analyses them too", LayersLeftOutWarning, stacklevel=3)
        return kept

    # -- public API ----------------------------------------------------------------------------

    def describe(self, model=None, layers=None, min_evals=DEFAULT_MIN_EVALS, max_evals=DEFAULT_MAX_EVALS,
                 max_N=DEFAULT_MAX_N, pool=True, conv2d_norm=True, start_ids=0, large_layers=False,
                 savefig="ww-img", intra=False, peft=False, base_model=None, **unsupported):
        """The layers analyze() would analyse, without spectra: layer_id,
        name, M, N, Q, layer_type, longname, num_evals (M * rf), rf. A
        folder's tensors are not read (their shapes are in the files'
        headers). savefig is checked as WeightWatcher checks it (a bool or a
        str) and otherwise unused, as there. peft: the rows analyze(peft=...)
        gives (the BA and W + BA layers, a peft column), read from the
        shapes alone. intra=True is refused as WeightWatcher 0.7.7's
        describe refuses it (its default params have randomize and vectors
        set, which valid_params refuses with intra). base_model: the model's
        rows (a delta has the model's shapes)."""
        if unsupported.pop("ww2x", False):  # WeightWatcher: "WW2X option deprecated, reverting to POOL=False"
            pool = False
        _check_params(dict(unsupported, min_evals=min_evals, max_evals=max_evals, max_N=max_N, pool=pool,
                           start_ids=start_ids, savefig=savefig, intra=intra, randomize=True, vectors=True))
        _check_unsupported(pool, unsupported)
        with_base = _peft_mode(peft)
        chosen = self._layers(self._model(model), layers, min_evals, max_evals, max_N, start_ids, large_layers, pool)
        base = self._base(model, base_model, chosen, layers, min_evals, max_evals, max_N, start_ids, large_layers)
        _check_base(base, pool, intra, peft)
        if peft:
            items = [(item[1], {"peft": item[0] == "matrix"}) for item in _peft_layers(chosen, with_base, False)]
        else:
            items = [(l, {}) for l in chosen]
        rows = []
        for l, extra in items:
            row = {"layer_id": l.layer_id, "name": l.name, "longname": l.longname, "layer_type": l.kind, "N": l.N,
                   "M": l.M, "rf": l.rf, "Q": l.N / l.M if l.M > 0 else -1,
                   "num_evals": l.M * l.rf if pool else l.M, **extra}
            if pool or peft:
                rows.append(row)
            else:  # WW2xSliceIterator: a row per kh*kw slice of a Conv2d, slice_id 0 for a matrix
                rows.extend(dict(row, slice_id=s) for s in range(l.rf if l.kind == "conv2d" else 1))
        return _ordered(rows)

    def analyze(self, model=None, layers=None, min_evals=DEFAULT_MIN_EVALS, max_evals=DEFAULT_MAX_EVALS,
                max_N=DEFAULT_MAX_N, plot=False, randomize=False, savefig="ww-img", mp_fit=False,
                conv2d_norm=True, pool=True, tolerance=WEAK_RANK_LOSS_TOLERANCE, start_ids=0, min_size=None,
                max_size=None, svd_method="fast", large_layers=False, fit="PL", pl_package="ww", xmax=None,
                fix_fingers=False, xmin_max=None, max_fingers=DEFAULT_MAX_FINGERS,
                finger_thresh=DEFAULT_FINGER_THRESH, intra=False, sparsify=True, peft=False, base_model=None,
                detX=False, **unsupported) -> pd.DataFrame:
        """WeightWatcher.analyze(): one row per analysed layer with
        WeightWatcher 0.7.7's columns (module docstring), in its order.
        large_layers=True: also the layers WeightWatcher leaves out for their
        size (N > max_N, M*rf > max_evals), in their place in the order
        (without it they are left out as there, with a LayersLeftOutWarning
        naming them).

        intra=True (WWIntraLayerIterator, _intra_layers): a row per pair of
        consecutive kept layers whose matrices chain, the ESD being the
        singular values (not their squares) of their normalised product,
        sparsified by a random 0/1 matrix unless sparsify=False; an Xflag
        column. WeightWatcher refuses it with randomize, vectors or
        conv2d_fft, and so does this.

        peft=True (WWPeftLayerIterator, _peft_layers): a row per LoRA pair
        (lora_A, lora_B layers of a module or of an adapter folder's
        adapter_model.safetensors), the ESD being the r largest squared
        singular values of BA; peft="with_base" also the other layers and
        W + BA; a peft column. randomize with peft is not reproduced.

        base_model (here or given to the constructor: WWDeltaLayerIterator,
        _delta_layers): each layer's weight less the base model's layer
        paired with it, with pool=True and neither intra nor peft (which
        WeightWatcher's delta iterator ignores, half-way)."""
        if unsupported.pop("ww2x", False):  # WeightWatcher: "WW2X option deprecated, reverting to POOL=False"
            pool = False
        _check_params(dict(unsupported, min_evals=min_evals, max_evals=max_evals, max_N=max_N, pool=pool,
                           start_ids=start_ids, savefig=savefig, randomize=randomize, fit=fit,
                           pl_package=pl_package, xmax=xmax, fix_fingers=fix_fingers, max_fingers=max_fingers,
                           intra=intra))
        _check_unsupported(pool, unsupported)
        fit_type, fix_fingers = _fit_options(fit, pl_package, xmax, fix_fingers)
        if svd_method not in ("fast", "accurate"):
            raise ValueError(f"svd_method must be 'fast' or 'accurate', got {svd_method!r}")
        if not isinstance(sparsify, (bool, np.bool_)):
            raise TypeError(f"sparsify must be a bool, got {sparsify!r}")
        with_base = _peft_mode(peft)
        if peft and not intra and randomize:
            raise ValueError("randomize=True with peft is not reproduced by spectral_ext.compat.weightwatcher")
        chosen = self._layers(self._model(model), layers, min_evals, max_evals, max_N, start_ids, large_layers, pool)
        base = self._base(model, base_model, chosen, layers, min_evals, max_evals, max_N, start_ids, large_layers)
        _check_base(base, pool, intra, peft)
        if base is not None:
            chosen = _delta_layers(chosen, base)
        if intra or peft:  # WeightWatcher's intra / peft iterators: no slices, conv2d_count = 1 (sqrt(1/2))
            entries = self._iterated_spectra(chosen, intra, sparsify, conv2d_norm, with_base)
        else:
            for layer in chosen:
                if conv2d_norm and layer.kind == "conv2d":  # sqrt(conv2d_count / 2): count = rf for a slice
                    layer.norm = math.sqrt((1 if pool else layer.rf) / 2.0)
            svs = _layer_singular_values(chosen)
            if not pool:  # WW2xSliceIterator: each slice its own row (its singular values from the layer's batch)
                chosen, svs = zip(*[(layer.slice_copy(s), sv[s:s + 1]) for layer, sv in zip(chosen, svs)
                                    for s in range(len(sv))]) if chosen else ((), ())
            entries = [(layer, sv, np.sort((sv ** 2).reshape(-1)),
                        {} if pool else {"slice_id": layer.slice_id}) for layer, sv in zip(chosen, svs)]
        evals = [e[2] for e in entries]
        fits = {}
        if pl_package == "ww":  # WWFit, batched over the layers of one ESD size
            for n in sorted({len(e) for e in evals}):
                same = [k for k, e in enumerate(evals) if len(e) == n]
                frame = spectra.fit_power_laws(np.stack([evals[k] for k in same]),
                                               convention=WEIGHTWATCHER).to_frame()
                fits.update({k: frame.iloc[j] for j, k in enumerate(same)})
        else:  # the powerlaw package, layer by layer, called as WeightWatcher calls it
            fits = {k: _powerlaw_package_fit(e, fit_type, xmax, fix_fingers, xmin_max) for k, e in enumerate(evals)}
        clipped = {}
        if fix_fingers == "clip_xmax":
            clipped = {k: _clip_fingers(e, fits[k], pl_package, xmax, max_fingers, finger_thresh)
                       for k, e in enumerate(evals)}
            fits = {k: c[0] for k, c in clipped.items()}
        rows = []
        for k, (layer, sv, _, extra) in enumerate(entries):
            row = _esd_columns(layer, sv, evals[k], tolerance)
            row.update(_fit_columns(evals[k], fits[k]))
            if clipped:
                row.update(num_fingers=clipped[k][1], raw_alpha=clipped[k][2])
            if fit_type == "truncated_power_law":
                row["Lambda"] = fits[k]["Lambda"]
            if mp_fit:
                row.update(_mp_columns(evals[k], layer, ""))
            if randomize:
                row.update(_random_columns(evals[k], layer, *self._random_singular_values(layer)))
            if detX:
                row.update(_detX_columns(evals[k], row["num_pl_spikes"]))
            row.update(_norm_columns(evals[k], row["alpha"], layer.N))
            row.update(extra)
            rows.append(row)
            if plot:
                plot_id = f"{layer.layer_id}:{layer.slice_id}" if "slice_id" in extra else layer.layer_id
                self.figures[plot_id] = self._plot(layer, evals[k], fits[k], savefig, plot_id)
        self.details = _ordered(rows)
        return self.details

    @staticmethod
    def _iterated_spectra(chosen, intra, sparsify, conv2d_norm, with_base):
        """(layer, sv (1, k) or (rf, k), evals ascending, extra columns) per
        row of WeightWatcher's intra or peft iterator, in its order. intra:
        the ESD is the singular values of X themselves (combined_eigenvalues'
        INTRA branch), sv their square roots. peft: the layers analysed as
        they are go through _layer_singular_values in one batch."""
        if intra:
            out = []
            for layer, X, n_comp in _intra_layers(chosen, sparsify, conv2d_norm):
                s = _top_singular_values(X, n_comp)
                out.append((layer, np.sqrt(s)[None], s, {"Xflag": True}))
            return out
        items = list(_peft_layers(chosen, with_base))
        plain = [item[1] for item in items if item[0] == "layer"]
        for layer in plain:
            layer.norm = math.sqrt(0.5) if conv2d_norm and layer.kind == "conv2d" else 1.0
        plain_svs = iter(_layer_singular_values(plain))
        out = []
        for item in items:
            if item[0] == "layer":
                sv = next(plain_svs)
                out.append((item[1], sv, np.sort((sv ** 2).reshape(-1)), {"peft": False}))
            else:
                _, layer, X, n_comp, rowspace = item
                s = _top_singular_values(X, n_comp, rowspace)
                out.append((layer, s[None], s ** 2, {"peft": True}))
        return out

    def get_details(self):
        return self.details

    def get_summary(self, details: pd.DataFrame | None = None) -> dict:
        """Means of log_norm, alpha, alpha_weighted, log_alpha_norm,
        log_spectral_norm, stable_rank and mp_softrank over the layers."""
        details = self.details if details is None else details
        if details is None:
            raise ValueError("details: run analyze() first or pass its DataFrame")
        return {m: details[m].mean() for m in SUMMARY_METRICS if m in details.columns}

    def get_ESD(self, model=None, layer=None, random=False, params=None) -> np.ndarray:
        """The ESD (ascending) of one layer by id or name, unscaled as
        WeightWatcher's get_ESD returns it; [] when there is no such layer."""
        if random:
            raise ValueError("random=True is not reproduced by get_ESD (use analyze(randomize=True))")
        if not isinstance(layer, (numbers.Integral, str)) or isinstance(layer, bool):
            raise TypeError(f"layer must be a layer id (int) or name (str), got {layer!r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LayersLeftOutWarning)
            found = self._layers(self._model(model), [layer], DEFAULT_MIN_EVALS, DEFAULT_MAX_EVALS, DEFAULT_MAX_N)
        if not found:
            warnings.warn(f"no analysable layer {layer!r}", stacklevel=2)
            return []
        sv = _singular_values([found[0].slices])[0]
        return np.sort((sv ** 2).reshape(-1))

    # -- SVD smoothing and sharpness ---------------------------------------------------------------

    def SVDSmoothing(self, model=None, percent=0.8, pool=True, layers=None, method="detX", fit="PL", plot=False,
                     start_ids=0, svd_method="fast", truncation="randomized"):
        """WeightWatcher.SVDSmoothing on a copy: each chosen layer's weight
        replaced by a rank-k smoothing (see truncation below; for a Conv2d
        each kh*kw slice W[:, :, i, j] at rank ceil(k / rf)),
        k from `method` on the layer's unscaled pooled ESD: "detX" (the
        default: the detX = 1 tail), "svd" (int(percent * M * rf); a
        negative k drops the top -k instead), "alpha_min" (the power-law
        tail's size), "rmt" (the MP fit's spikes), "auto" (spikes when
        alpha > 6, else detX). The model is a torch.nn.Module or a
        state_dict (WeightWatcher's PyStateDictLayer: ids from 1, 2-d weights
        dense, 4-d conv2d, a {"state_dict": ...} checkpoint unwrapped).
        WeightWatcher changes the model in place and returns it; the adapter
        returns the changed copy and watches it from then on (self.model),
        the model given untouched. Weights (and the biases of changed
        non-Conv2d layers) come back float32, as there.

        Keeping the top k, WeightWatcher (on a CPU) projects on the top k
        directions that sklearn's randomized TruncatedSVD(n_iter=7,
        random_state=42) finds, in float32: an estimate, 6e-2 - 3e-1 away
        (relative, Frobenius) from the exact truncation on flat random
        spectra. truncation="randomized" (the default) computes that same
        estimator in float64 (the same draws and subspace; 1e-5 - 4e-5
        relative from WeightWatcher's float32 numbers); truncation="exact"
        the exact rank-k truncation. Dropping the top k (a negative k) is an
        exact SVD on both sides. svd_method is checked and otherwise unused:
        on a CUDA machine WeightWatcher's "fast" takes torch.svd_lowrank
        instead, which is not reproduced."""
        if not pool:
            raise ValueError("only pooling (not ww2x) is supported yet for SVDSmoothness, ending")
        _check_params({"pool": pool, "start_ids": start_ids, "fit": fit, "layers": layers})
        if svd_method not in ("fast", "accurate"):
            raise ValueError(f"svd_method must be 'fast' or 'accurate', got {svd_method!r}")
        if truncation not in ("randomized", "exact"):
            raise ValueError(f"truncation must be 'randomized' (WeightWatcher's) or 'exact', got {truncation!r}")

        def count(layer, evals, slices):
            if method in ("alpha_min", "auto"):
                fit_row = spectra.fit_power_laws(evals[None], convention=WEIGHTWATCHER).to_frame().iloc[0]
                spikes = _fit_columns(evals, fit_row)
                if method == "alpha_min":
                    return spikes["num_pl_spikes"]
                if spikes["alpha"] > 6:
                    return _mp_columns(evals, layer, "")["num_spikes"]
                return _detX_num(evals)
            if method == "detX":
                return _detX_num(evals)
            if method == "rmt":
                return _mp_columns(evals, layer, "")["num_spikes"]
            return int(percent * layer.M * layer.rf)  # "svd" and unknown methods (logged there) use percent

        return self._transform(model, layers, start_ids, count, truncation)[1]

    def SVDSharpness(self, model=None, pool=True, layers=None, plot=False, start_ids=0):
        """WeightWatcher.SVDSharpness on a copy: per layer, its slices
        shuffled with numpy's global generator (np.random.permutation, in
        WeightWatcher's order), the MP fit of the shuffled ESD counts k
        spikes, and the top k singular values of the original weight are
        zeroed (per slice ceil(-k / rf) for a Conv2d, so none below rf
        spikes). A torch.nn.Module or a state_dict, as SVDSmoothing. Returns
        the copy (WeightWatcher returns its `model` argument, None when the
        model was given to the constructor) and watches it from then on."""
        if not pool:
            raise ValueError("omly pool=True, (not ww2x) is supported yet for SVDSharpness, ending")
        _check_params({"pool": pool, "start_ids": start_ids, "layers": layers})

        def count(layer, evals, slices):
            flat = slices.reshape(len(slices), -1).numpy()
            shuffled = [torch.from_numpy(f[np.random.permutation(len(f))]).reshape(slices.shape[1:])[None]
                        for f in flat]
            rand = np.sort(np.concatenate([sv.reshape(-1) for sv in _singular_values(shuffled)]) ** 2)
            return -_mp_columns(rand, layer, "")["num_spikes"]

        return self._transform(model, layers, start_ids, count)[0]

    def _transform(self, model, layers, start_ids, count, truncation="randomized"):
        """apply_svd_smoothing over WeightWatcher's default layer choice, on a deep copy of the model
        (a module or a state_dict). Returns (the copy, the copy's watched part: the module, or the
        state_dict inside a {"state_dict": ...} checkpoint, as WeightWatcher.set_model_ unwraps it)."""
        model = self._model(model)
        kind = _source_kind(model)
        if kind == "folder":
            raise TypeError("SVDSmoothing / SVDSharpness take a torch.nn.Module or a state_dict (a copy is changed "
                            "and returned); WeightWatcher's apply_svd_smoothing leaves a model folder unchanged")
        out = copy.deepcopy(model)
        if kind == "module":
            watched, modules = out, dict(out.named_modules())
            tensors = {}
            for name, module in modules.items():
                for part in ("weight", "bias"):
                    if isinstance(getattr(module, part, None), torch.Tensor):
                        tensors[f"{name}.{part}" if name else part] = (module, part)

            def read(key):
                module, part = tensors[key]
                return getattr(module, part).detach()

            def write(key, value):
                module, part = tensors[key]
                getattr(module, part).data = value
        else:
            watched = out["state_dict"] if isinstance(out.get("state_dict"), Mapping) else out
            tensors = watched

            def read(key):
                return torch.as_tensor(watched[key]).detach()

            def write(key, value):  # PyStateDictLayer.replace_layer_weights: a new tensor under the key
                watched[key] = value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LayersLeftOutWarning)
            chosen = self._layers(watched, layers, DEFAULT_MIN_EVALS, DEFAULT_MAX_EVALS, DEFAULT_MAX_N, start_ids)
        for layer in chosen:
            slices = layer.slices
            evals = np.sort((_singular_values([slices])[0] ** 2).reshape(-1))
            k = int(count(layer, evals, slices))
            prefix = f"{layer.longname}." if kind == "state_dict" or layer.longname in modules else ""
            W = read(prefix + "weight").cpu().float().to(torch.float64)
            if layer.kind == "conv2d":
                k = int(np.ceil(k / layer.rf))
                new = _truncate(W.permute(2, 3, 0, 1), k, truncation).permute(2, 3, 0, 1)
            else:
                new = _truncate(W, k, truncation)
                if prefix + "bias" in tensors:  # replace_layer_weights(W, B): the bias back as float32 too
                    write(prefix + "bias", read(prefix + "bias").cpu().float().clone())
            with torch.no_grad():
                write(prefix + "weight", new.float().contiguous())
        self.model = watched
        return out, watched

    # -- distances -----------------------------------------------------------------------------------

    def distances(self, model_1, model_2, method="raw", layers=None, start_ids=0, pool=True, channels=None):
        """WeightWatcher.distances: (mean delta_W, mean delta_b, a frame
        indexed by layer_id) over the layers its default iterator keeps
        (pool=False: a row per Conv2d slice, with slice_id). "raw": the
        Frobenius norm of the difference of the weights as stored (a Conv2d's
        4-d tensor; M, N its smallest and largest dimensions) and of a
        Linear's biases (b_shape, delta_b; "unknown" and 0 otherwise);
        "euclidean" / "cka": the mean over the N x M slices of ||W1 - W2|| or
        ||W1^T W2|| / sqrt(||W1^T W1|| ||W2 W2^T||) (uncentred, as there).
        Norms in float32 of float32 weights, as there."""
        _check_params({"pool": pool, "start_ids": start_ids, "channels": channels, "layers": layers})
        if channels is not None:
            raise ValueError("channels is not reproduced by spectral_ext.compat.weightwatcher")
        method = "raw" if method is None else method.lower()
        if method not in ("raw", "euclidean", "cka"):
            raise ValueError(f"Error, method not valid: \n {method}")
        iters = []
        for model in (model_1, model_2):
            if not isinstance(model, nn.Module):
                raise TypeError("distances takes two torch.nn.Module models")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LayersLeftOutWarning)
                chosen = self._layers(model, layers, DEFAULT_MIN_EVALS, DEFAULT_MAX_EVALS, DEFAULT_MAX_N, start_ids,
                                      pool=pool)
            modules = dict(model.named_modules())
            if not pool:
                chosen = [l.slice_copy(s) for l in chosen for s in range(l.rf if l.kind == "conv2d" else 1)]
            iters.append([(l, modules[l.longname if l.longname in modules else ""]) for l in chosen])
        rows, data, per_layer = [], {}, [None, None, None]
        for (l1, m1), (l2, m2) in zip(*iters):  # a dict carried from row to row, as there
            data.update(layer_id=l1.layer_id, name=l1.name, longname=l1.longname, method=method)
            if not pool:
                data["slice_id"] = l1.slice_id
            if method == "raw":
                W1, W2 = (m.weight.detach().cpu().float() for m in (m1, m2))
                data.update(M=min(W1.shape), N=max(W1.shape), delta_W=_norm32(W1 - W2))
                b1, b2 = (m.bias.detach().cpu().float() if l.kind == "dense" and getattr(m, "bias", None)
                          is not None else None for l, m in ((l1, m1), (l2, m2)))
                if b1 is not None and b2 is not None and len(b1) == len(b2):
                    data.update(b_shape=len(b1), delta_b=_norm32(b1 - b2))  # (n,) read by pandas as n there
                else:
                    data.update(b_shape="unknown", delta_b=0)
            else:
                # WeightWatcher's own float32 numpy operations on its Wmats (the same bits), every slice of a
                # layer at once (pool=False's rows take theirs in turn): the euclidean difference taken once per
                # layer (elementwise, so each slice's is the same), each slice's norm summing its entries in the
                # order WeightWatcher's W1 - W2 lays them out; cka's products on slices laid out contiguously
                if per_layer[0] != l1.layer_id:
                    (w1, full1), (w2, full2) = ((l.read_float32(), copy.copy(l)) for l in (l1, l2))
                    full1.slice_id = full2.slice_id = None
                    if method == "euclidean":
                        values = [np.linalg.norm(D) for D in _wmats(w1 - w2, full1)]
                    else:
                        values = [_cka32(W1, W2) for W1, W2 in zip(_wmats(w1, full1, True), _wmats(w2, full2, True))]
                    per_layer[:] = [l1.layer_id, values, _wmats(w1, full1)[0].shape]
                _, values, shape = per_layer
                per_slice = values if l1.slice_id is None else values[l1.slice_id:l1.slice_id + 1]
                data.update(M=np.min(shape), N=np.max(shape), b_shape="unknown", delta_b=0.0)
                total = 0.0
                for value in per_slice:  # summed in order, in float32, as there
                    total += value
                data["delta_W"] = total / float(len(per_slice))
            rows.append(dict(data))
        frame = pd.DataFrame.from_records(rows)
        lead = ["method", "layer_id", "name", "delta_W", "delta_b", "M", "N", "b_shape"]
        frame = frame[lead + [c for c in frame.columns if c not in lead]].set_index("layer_id")
        return np.mean(frame["delta_W"].to_numpy()), np.mean(frame["delta_b"].to_numpy()), frame

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _random_singular_values(layer):
        """Shuffled copies of each scaled slice of one layer, drawn from
        numpy's global generator in WeightWatcher's order (random_eigenvalues:
        the replicas for rand_evals, then one more set for the distances),
        their singular values batched; (rand_evals, rand_once) ascending."""
        n_comp = layer.M * layer.rf if layer.kind == "conv2d" else layer.M
        replicas = 5 if n_comp < 100 else 1
        slices = layer.slices
        flat = (slices * layer.norm).reshape(len(slices), -1).numpy()
        shape = tuple(slices.shape[1:])
        del slices
        out = []
        for count in (replicas, 1):
            draws = [torch.from_numpy(flat[s][np.random.permutation(flat.shape[1])]).reshape(1, *shape)
                     for _ in range(count) for s in range(len(flat))]
            svs = _singular_values(draws)
            out.append(np.sort(np.concatenate([sv.reshape(-1) for sv in svs]) ** 2))
        return tuple(out)

    @staticmethod
    def _plot(layer, evals, fit, savefig, plot_id):
        """The layer's ESD above 1e-5 on log-log axes with its power-law fit
        (kept in self.figures by layer id), saved as
        <savefig>/ww.layer<id>.esd.png when savefig is a folder or True."""
        from .. import plot

        positive = evals[evals > EVALS_THRESH]
        if not len(positive):
            return None
        fig = plot.esd(positive, fit=dict(fit) if fit["status"] == "success" else None,
                       label=f"layer {layer.layer_id} ({layer.longname})")
        if savefig:
            folder = savefig if isinstance(savefig, str) else "ww-img"
            os.makedirs(folder, exist_ok=True)
            fig.savefig(os.path.join(folder, f"ww.layer{plot_id}.esd.png"), dpi=100)
        return fig


def _peft_mode(peft) -> bool:
    """WeightWatcher's peft argument: False (or None) off; "with_base"
    (PEFT_WITH_BASE) the LoRA products and the other layers; True or any
    other string (its DEFAULT_PEFT comment names "peft") the LoRA products
    only. Returns whether the base layers are kept."""
    if not isinstance(peft, (bool, np.bool_, str)) and peft is not None:
        raise TypeError(f"peft must be True, False or 'with_base', got {peft!r}")
    return peft == "with_base"


def _check_base(base, pool, intra, peft) -> None:
    """With a base model WeightWatcher builds its delta iterator from plain
    WWLayerIterators whatever pool, intra and peft say (intra still turns the
    ESD into singular values): those mixtures are refused by name."""
    if base is None:
        return
    for name, value, plain in (("pool", pool, True), ("intra", intra, False), ("peft", peft, False)):
        if value != plain:
            raise ValueError(f"base_model with {name}={value!r} is not reproduced by "
                             f"spectral_ext.compat.weightwatcher (only {name}={plain!r})")


def _delta_load(load, shape: tuple, base: _Layer) -> torch.Tensor:
    """WWDeltaLayerIterator's W_model - W_base in float32 (the base's
    transpose when that is its shape); `load` reads the model's weight."""
    w = load().to("cpu").float().reshape(shape)
    b = base._load().to("cpu").float().reshape(base.shape)
    return w - (b.mT if b.shape != w.shape else b)


def _delta_layers(chosen, base):
    """WWDeltaLayerIterator.ww_layer_iter_: the model's layers in order,
    each paired with the base's next kept layer when its name is contained
    in that layer's name (then the base moves on; otherwise the layer is
    analysed as it is). A pair whose shapes differ, which WeightWatcher
    replaces by zeros (dense) or pairs slice by slice (conv2d), is
    refused."""
    out, right = [], iter(base)
    other = next(right, None)
    for layer in chosen:
        if other is not None and layer.name in other.name:
            if other.shape != layer.shape and not (layer.kind != "conv2d" and other.shape[::-1] == layer.shape):
                raise ValueError(f"base_model: layer {layer.longname} {layer.shape} and the base's {other.longname} "
                                 f"{other.shape} differ in shape (WeightWatcher analyses zeros or part of the "
                                 "slices there: not reproduced)")
            layer = copy.copy(layer)
            layer._load = functools.partial(_delta_load, layer._load, layer.shape, other)
            other = next(right, None)
        out.append(layer)
    return out


def _check_unsupported(pool, unsupported):
    for key, value in unsupported.items():
        if key not in _UNSUPPORTED:
            raise TypeError(f"unexpected argument {key!r}")
        if value != _UNSUPPORTED[key]:
            raise ValueError(f"{key}={value!r} is not reproduced by spectral_ext.compat.weightwatcher "
                             f"(only {key}={_UNSUPPORTED[key]!r})")


class InvalidParamsError(ValueError):
    """WeightWatcher.valid_params' refusal: there a bare Exception("Error,
    params not valid: ..."); here a ValueError (an Exception, so
    ``except Exception`` and ``assertRaises(Exception)`` catch it as there)
    with the same opening words and the reason."""


def _check_params(params: dict) -> None:
    """WeightWatcher.valid_params, check by check, in its order: the size
    caps, conv2d_fft with pool=False or intra, channels, mixed-sign
    layer ids, savefig (a bool or a str), the fit type, start_ids < 0. Run
    before any "not reproduced" refusal, so that what WeightWatcher refuses
    is refused for its reason."""
    reasons = []
    min_evals, max_evals, max_N = params.get("min_evals"), params.get("max_evals"), params.get("max_N")
    if min_evals and max_evals and min_evals >= max_evals:
        reasons.append(f"min_evals {min_evals} > max_evals {max_evals}")
    elif max_evals and max_evals < -1:
        reasons.append(f"max_evals {max_evals} < -1")
    if max_N is not None and max_N < (max_evals or 0):
        reasons.append(f"max_N {max_N} < max_evals {max_evals}")
    if max_N is not None and max_N < (min_evals or 0):
        reasons.append(f"max_N {max_N} < min_evals {min_evals}")
    if not params.get("pool", True) and params.get("conv2d_fft"):
        reasons.append("can not specify conv2d_fft without pool=True")
    if params.get("intra") and params.get("conv2d_fft"):
        reasons.append("can not specify intra and conv2d_fft")
    channels = params.get("channels")
    if isinstance(channels, str) and channels.lower() not in ("first", "last"):
        reasons.append(f"unknown channels {channels}")
    savefig = params.get("savefig", "ww-img")
    if not isinstance(savefig, (str, bool)):
        reasons.append(f"savefig must be a bool or a str, got {savefig!r}")
    fix_fingers, xmax = params.get("fix_fingers", False), params.get("xmax")
    if fix_fingers:
        if fix_fingers not in ("xmin_peak", "clip_xmax"):
            reasons.append(f"Unknown how to fix fingers {fix_fingers}")
        elif xmax is not None and xmax is not False and isinstance(xmax, int):
            reasons.append(f"Can not set fix fingers, with xmax ={xmax}")
        max_fingers = params.get("max_fingers")
        if max_fingers is not None and max_fingers < 1:
            reasons.append(f"Can not set max fingers < 1, max_fingers={max_fingers}")
    fit = params.get("fit", "PL")
    if fit not in ("PL", "TPL", "E_TPL", "power_law", "truncated_power_law"):
        reasons.append(f"Unknown fit type {fit}")
    if fit == "E_TPL" and fix_fingers == "clip_xmax":
        reasons.append("E-TPL and fix_fingers =clip_xmax can not both be explicitly set")
    if params.get("intra") and (params.get("randomize") or params.get("vectors")):
        reasons.append("Can not set intra=True with randomize=True or vectors=True at this time")
    start_ids = params.get("start_ids", 0)
    if start_ids is not None and start_ids < 0:
        reasons.append(f"start_ids {start_ids} < 0")
    pl_package = params.get("pl_package", "ww")
    if pl_package not in ("powerlaw", "ww"):
        reasons.append(f"Powerlaw Package not valid={pl_package}")
    if not isinstance(xmax, int) and xmax not in (False, None, "force"):
        reasons.append(f"xmax must be None or 'force', xmax={xmax}")
    elif isinstance(xmax, int) and xmax == 0:
        reasons.append("xmax can not be 0")
    if pl_package == "ww":
        if xmax == "force":
            reasons.append("xmax=force not available if using pl_package=ww")
        if fit not in ("PL", "power_law"):
            reasons.append(f"pl_package=ww only supports PowerLaw fits, but fit={fit}")
    if reasons:
        raise InvalidParamsError("Error, params not valid: " + "; ".join(reasons))


def _check_caps(min_evals, max_evals, max_N):
    """WeightWatcher.valid_params' checks of the size caps (there an Exception)."""
    _check_params({"min_evals": min_evals, "max_evals": max_evals, "max_N": max_N})


def _ordered(rows) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows)
    if not len(frame):
        return frame
    for column in frame.columns:  # WeightWatcher's rows keep None (a failed fit's xmax) beside numbers
        if frame[column].dtype.kind == "f" and any(column in row and row[column] is None for row in rows):
            frame[column] = pd.Series([row.get(column) for row in rows], index=frame.index, dtype=object)
    lead = ["layer_id", "name"]
    return frame[lead + sorted(c for c in frame.columns if c not in lead)]


def _esd_columns(layer, sv, evals, tolerance) -> dict:
    """apply_esd's columns (combined_eigenvalues: per-slice rank loss and the running sv_min)."""
    return {"layer_id": layer.layer_id, "name": layer.name, "longname": layer.longname, "layer_type": layer.kind,
            "N": layer.N, "M": layer.M, "rf": layer.rf, "Q": layer.N / layer.M if layer.M > 0 else -1,
            "has_esd": True, "num_evals": len(evals), "sv_max": float(sv.max()),
            "sv_min": float(max(0.0, sv.min(axis=1).max())),
            "rank_loss": int(sum(len(s) - _matrix_rank(s, layer.N) for s in sv)),
            "weak_rank_loss": int(np.sum(evals < tolerance)), "lambda_max": float(np.max(evals))}


def _truncate(W: torch.Tensor, k: int, truncation: str = "randomized") -> torch.Tensor:
    """apply_svd_smoothing on (..., r, c) float64 matrices: k > 0 keeps the
    top k singular directions (smooth_W: "randomized", WeightWatcher's
    estimator, see _randomized_truncation; "exact", U_k S_k V_k^T), k < 0
    zeroes the top -k (smooth_W_alt: an exact SVD there too), k = 0 leaves W
    as it is."""
    if k == 0:
        return W
    if k > 0 and truncation == "randomized":
        out = torch.empty_like(W)
        for index in np.ndindex(*W.shape[:-2]):
            out[index] = _randomized_truncation(W[index], k)
        return out
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    S = S.clone()
    if k > 0:
        S[..., k:] = 0
    else:
        S[..., :-k] = 0
    return (U * S[..., None, :]) @ Vh


def _randomized_truncation(W: torch.Tensor, k: int) -> torch.Tensor:
    """WeightWatcher's smooth_W on a CPU (RMT_Util._smooth_W_accurate), in
    float64: with X = W or W^T, whichever is tall (m x n), sklearn's
    TruncatedSVD(k, n_iter=7, random_state=42) returns X V V^T, V the top k
    right singular vectors of B = Q^T X, Q an orthonormal basis of
    X (X^T X)^7 Omega (randomized_range_finder; Omega: n x (k + 10) normal
    draws of RandomState(42), rounded to float32 as there). B^T B =
    H = T S^+ T^T with T = G Q_7, S = Q_7^T G Q_7, G = X^T X and Q_7 a basis
    of G^7 Omega, so everything but the last product is n x n work: G once
    (one syrk) instead of 15 m x n products, the same subspace. That route is
    taken where it costs fewer flops (tall layers, larger k: 0.15 against
    0.46 s for sklearn's float32 at 4608 x 512, k = 300); sklearn's own
    route, in float64, elsewhere (square layers with a small k, where float64
    costs more than its float32: 0.29 against 0.12 s at 2048 x 2048, k = 20).
    When k + 10 >= n the draws span everything and this is the exact
    truncation; an all-zero X gives zeros, as there."""
    import scipy.linalg

    wide = W.shape[-2] < W.shape[-1]
    X = (W.mT if wide else W).contiguous().numpy()
    (m, n), p = X.shape, k + 10
    if n < 2:
        raise ValueError(f"Found array with {n} feature(s) (shape={X.shape}) while a minimum of 2 is required by "
                         "TruncatedSVD.")
    if k > n:
        raise ValueError(f"n_components({k}) must be <= n_features({n}).")

    def basis(Y):  # sklearn's LU normaliser (P L of Y = P L U: a basis of Y's span), silent on zero pivots as there
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            return _permuted_unit_lower(*scipy.linalg.lu_factor(Y, check_finite=False))

    if p >= n:
        V = np.linalg.svd(X, full_matrices=False)[2][:k].T
    elif 32 * m * n * p + 4 * m * p * p < m * n * n + 16 * n * n * p:  # sklearn's route: 15 thin products
        Q = _draws(n, p)
        for _ in range(7):
            Q = basis(X.T @ basis(X @ Q))
        Q = np.linalg.qr(X @ Q)[0]
        V = np.linalg.svd(Q.T @ X, full_matrices=False)[2][:k].T
    else:
        G = X.T @ X  # numpy's syrk
        Q = _draws(n, p)
        for _ in range(7):
            Q = basis(G @ Q)
        T = G @ Q
        S = Q.T @ T
        try:
            F = scipy.linalg.solve_triangular(np.linalg.cholesky(S), T.T, lower=True, check_finite=False).T
        except np.linalg.LinAlgError:  # X of rank below k + 10: S^+ on S's range
            lam, U = np.linalg.eigh(S)
            keep = lam > lam[-1] * p * np.finfo(np.float64).eps
            if not keep.any():  # X = 0
                return torch.zeros_like(W)
            F = (T @ U[:, keep]) / np.sqrt(lam[keep])
        lam, Y = np.linalg.eigh(F.T @ F)  # H = F F^T: its top k eigenvectors from F's right side
        lam, Y = lam[::-1][:k], Y[:, ::-1][:, :k]
        if lam[-1] > lam[0] * p * np.finfo(np.float64).eps:
            V = (F @ Y) / np.sqrt(lam)
        else:
            V = np.linalg.svd(F, full_matrices=False)[0][:, :k]
    out = (X @ V) @ V.T if 2 * k < n else X @ (V @ V.T)
    out = torch.from_numpy(out)
    return out.mT if wide else out


@functools.lru_cache(maxsize=64)
def _draws(n: int, p: int) -> np.ndarray:
    """sklearn's Omega for TruncatedSVD(random_state=42) on float32 data: RandomState(42)'s n x p normal
    draws rounded to float32; the same for every slice of a layer, so drawn once (read-only)."""
    omega = np.random.RandomState(42).normal(size=(n, p)).astype(np.float32).astype(np.float64)
    omega.flags.writeable = False
    return omega


@functools.lru_cache(maxsize=64)
def _upper_triangle(p: int):
    return np.triu_indices(p, 1)


def _permuted_unit_lower(LU: np.ndarray, pivots: np.ndarray) -> np.ndarray:
    """P L from LAPACK getrf's packed (n, p) LU and row swaps: scipy.linalg.lu(permute_l=True)'s
    first output, 2-3x faster on the (512, 70) blocks of _randomized_truncation."""
    n, p = LU.shape
    L = LU.copy()
    L[_upper_triangle(p)] = 0.0  # np.tril builds an n x p mask each call: 5x slower here
    L[np.arange(p), np.arange(p)] = 1.0
    rows = np.arange(n)
    for i, j in enumerate(pivots):  # row i of P^T Y is row rows[i] of Y after the swaps
        rows[i], rows[j] = rows[j], rows[i]
    out = np.empty_like(L)
    out[rows] = L
    return out


def _norm32(x: torch.Tensor) -> float:
    """np.linalg.norm of a float32 array (a float32: sqrt of BLAS's dot of its
    entries in memory order), computed by numpy itself on the contiguous
    difference, so that WeightWatcher's raw distances come out to the bit."""
    return np.linalg.norm(x.contiguous().numpy())


def _wmats(w: np.ndarray, layer: "_Layer", contiguous: bool = False) -> list:
    """WWLayer.Wmats of a weight `w` given as its float32 numpy array (the
    shape torch gives it): the matrix, or a Conv2d's kh*kw slices
    w[:, :, i, j] in (i, j) order, each transposed when out < in
    (conv2D_Wmats), as views; the one slice of a pool=False row."""
    if layer.kind != "conv2d":
        mats = [w.reshape(layer.shape)]
    else:
        w = w.reshape(layer.shape)
        if contiguous:  # each slice one C-contiguous block: BLAS reads it in place, no copy per product
            w = np.ascontiguousarray(w.transpose(2, 3, 0, 1)).transpose(2, 3, 0, 1)
        mats = [w[:, :, i, j] for i in range(w.shape[2]) for j in range(w.shape[3])]
        mats = [m.T if m.shape[0] < m.shape[1] else m for m in mats]
    return mats if layer.slice_id is None else mats[layer.slice_id:layer.slice_id + 1]


def _cka32(W1: np.ndarray, W2: np.ndarray):
    """WeightWatcher.matrix_distance's uncentred "cka" of two float32
    matrices, its operations in its order (np.dot, np.linalg.norm): the
    same float32 value."""
    dist = np.linalg.norm(np.dot(W1.T, W2))
    norm = np.sqrt(np.linalg.norm(np.dot(W1.T, W1)) * np.linalg.norm(np.dot(W2, W2.T)))
    if norm < 0.000001:
        norm = norm + 0.000001
    return dist / norm


def _detX(evals):
    """RMT_Util.detX_constraint on the ESD rescaled to mean 1 (rescale_eigenvalues,
    rounding included): (num, idx, scale^2), num the size of the smallest tail
    evals[idx:] whose product reaches 1 ((0, 0) for fewer than 2 eigenvalues or a
    flat ESD; (len, 1) when none does, as its loop leaves it)."""
    scale = np.sqrt(len(evals)) / np.sqrt(np.sum(evals))
    if len(evals) < 2 or not evals[0] < evals[-1]:
        return 0, 0, scale * scale
    rescaled = (scale * scale) * evals
    for idx in range(len(evals) - 1, 0, -1):
        if np.prod(rescaled[idx:]) < 1.0:
            return len(evals) - idx, idx, scale * scale
    return len(evals), 1, scale * scale


def _detX_num(evals) -> int:
    return 0 if evals is None else _detX(evals)[0]


def _detX_columns(evals, num_pl_spikes) -> dict:
    """apply_detX's columns (detX=True): the detX tail's size (also num_ERG_spikes),
    its gap to the power-law tail, its smallest eigenvalue rescaled (named
    detX_val_unrescaled there) and back at the ESD's scale (detX_val)."""
    num, idx, scale2 = _detX(evals)
    rescaled = scale2 * evals
    return {"detX_num": num, "num_ERG_spikes": num, "ERG_gap": num - num_pl_spikes,
            "detX_val": (rescaled / scale2)[idx], "detX_val_unrescaled": rescaled[idx]}


def _fit_options(fit, pl_package, xmax, fix_fingers):
    """WeightWatcher.normalize_params' fit type (TPL and E_TPL are
    "truncated_power_law", E_TPL with fix_fingers="xmin_peak"), after
    _check_params; what is not reproduced is refused by name."""
    fit_type = {"PL": "power_law", "TPL": "truncated_power_law", "E_TPL": "truncated_power_law"}.get(fit, fit)
    if fit == "E_TPL":
        fix_fingers = "xmin_peak"
    if fix_fingers == "clip_xmax" and fit_type != "power_law":
        raise ValueError("fix_fingers='clip_xmax' with fit='TPL' is not reproduced by "
                         "spectral_ext.compat.weightwatcher (with fit='PL' it is)")
    if fix_fingers == "xmin_peak" and pl_package != "powerlaw":
        raise ValueError("fix_fingers with pl_package='ww' is not reproduced by spectral_ext.compat.weightwatcher "
                         "(use pl_package='powerlaw')")
    if xmax not in (None, False, "force"):
        raise ValueError(f"xmax={xmax!r} is not reproduced by spectral_ext.compat.weightwatcher "
                         "(only None or 'force')")
    return fit_type, fix_fingers


def _powerlaw_package_fit(evals, fit_type, xmax, fix_fingers, xmin_max) -> dict:
    """WeightWatcher.fit_powerlaw through the powerlaw package (WW_powerlaw.pl_fit
    with pl_package="powerlaw"): powerlaw.Fit on the eigenvalues above 1e-5 with
    distribution = xmin_distribution = the fit type; xmax="force" is the
    largest eigenvalue; fix_fingers="xmin_peak" searches xmin over
    (log10(0.95 peak), 1.5 peak) (those units, as there), the peak being the
    left edge of the fullest of 100 log10-spaced bins; TPL: alpha and Lambda
    of fit.truncated_power_law. Failures read -1 as there."""
    import contextlib
    import io

    import powerlaw

    xmax = float(np.max(evals)) if xmax == "force" else None if xmax is None or xmax is False else float(xmax)
    out = {"status": "failed", "alpha": -1, "Lambda": -1, "xmin": -1, "xmax": xmax, "ks": -1, "sigma": -1}
    try:
        nz = evals[evals > EVALS_THRESH]
        xmin = None
        if fix_fingers == "xmin_peak":
            counts, edges = np.histogram(np.log10(nz), bins=100)
            peak = 10 ** edges[np.argmax(counts)]
            xmin = (np.log10(0.95 * peak), 1.5 * peak if xmin_max is None else xmin_max)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            # WeightWatcher also passes distribution=fit_type, which powerlaw 1.x took and left unused
            # and powerlaw 2.0 refuses (a TypeError: every such fit fails there); it is left out here
            fit = powerlaw.Fit(nz, xmin=xmin, xmax=xmax, verbose=False, xmin_distribution=fit_type)
            if fit.alpha is None or np.isnan(fit.alpha):
                return out
            out.update(status="success", alpha=fit.alpha, xmin=fit.xmin, xmax=fit.xmax, ks=fit.D, sigma=fit.sigma)
            if fit_type == "truncated_power_law":
                out.update(alpha=fit.truncated_power_law.alpha, Lambda=fit.truncated_power_law.Lambda)
    except Exception:  # WeightWatcher logs any exception of the fit and reports it failed
        out.update(status="failed", alpha=-1, Lambda=-1, xmin=-1, ks=-1, sigma=-1, xmax=xmax)
    return out


def _clip_fingers(evals, first, pl_package, xmax, max_fingers, finger_thresh):
    """RMT_Util.fit_clipped_powerlaw (fix_fingers="clip_xmax"): power laws
    fitted to the ESD above 1e-5 less its idx largest eigenvalues, idx = 2,
    3, ... below max_fingers (10 unless it is at least half the ESD's size),
    each with xmax the largest clipped one when xmax is set, until an alpha
    falls more than finger_thresh below the whole ESD's (that fit is kept,
    num_fingers = idx - 1) or to 2 or below (the whole ESD's fit is kept, 0
    fingers); then up to 3 more clipped fits, which there only log a warning
    but fail the layer when one cannot be fitted. (fit, num_fingers,
    raw_alpha: the whole ESD's alpha). The layer's fit fails, as there, where
    a fit gets fewer than 2 eigenvalues (WWFit) or none (powerlaw), where
    the whole ESD's fit failed, or where no clipped fit runs (max_fingers
    <= 2 kept: its loop variable is then unset)."""
    failed = ({"status": "failed", "xmax": float(np.max(evals)) if xmax == "force" else None}, 0, -1)
    nz = evals[evals > EVALS_THRESH]
    if max_fingers is None or max_fingers < 0 or max_fingers < len(evals) / 2:
        max_fingers = DEFAULT_MAX_FINGERS
    force = xmax is not None and xmax is not False
    fewest = 2 if pl_package == "ww" else 1

    def alpha_of(data, top):  # top: xmax when it is set; a failed fit compares as WWFit's NaN
        if pl_package == "ww":  # WWFit's xmax is the data's own largest value anyway
            fit = spectra.fit_power_laws(data[None], convention=WEIGHTWATCHER).to_frame().iloc[0]
        else:
            fit = _powerlaw_package_fit(data, "power_law", top if force else None, False, None)
        return fit, fit["alpha"] if fit["status"] == "success" else np.nan

    if first["status"] != "success" or max_fingers <= 2:
        return failed
    best, fingers = first, 0
    for idx in range(2, max_fingers):
        if len(nz) - idx < fewest:
            return failed
        fit, last = alpha_of(nz[:-idx], nz[-idx])  # xmax: the smallest eigenvalue clipped
        if last + finger_thresh < first["alpha"]:
            best, fingers = fit, idx - 1
            break
        if last <= 2.0:  # its min_alpha
            break
    for idy in range(idx + 1, idx + 4):  # its check of the next 3 clipped fits
        if len(nz) - idy < fewest:
            return failed
        if abs(alpha_of(nz[:-idy], nz[-idy - 1])[1] - last) > finger_thresh:  # xmax: the data's largest
            break
    return best, fingers, first["alpha"]


def _fit_columns(evals, fit) -> dict:
    """apply_powerlaw's columns; a failed fit reads -1 as in WeightWatcher."""
    if fit["status"] != "success":
        xmax = fit["xmax"] if isinstance(fit, dict) else None  # the powerlaw path keeps "force"'s xmax
        alpha, xmin, D, sigma, spikes, status = -1, -1, -1, -1, -1, "failed"
    else:
        alpha, xmin, xmax, D, sigma = fit["alpha"], fit["xmin"], fit["xmax"], fit["ks"], fit["sigma"]
        spikes, status = int(np.sum(evals >= xmin)), "success"
    warning = "over-trained" if alpha < OVER_TRAINED_THRESH else "under-trained" if alpha > UNDER_TRAINED_THRESH \
        else ""
    return {"alpha": alpha, "xmin": xmin, "xmax": xmax, "D": D, "sigma": sigma, "num_pl_spikes": spikes,
            "status": status, "warning": warning}


def _mp_columns(evals, layer, prefix) -> dict:
    try:
        values = _mp_fit(evals, layer.N, layer.M)
    except (ValueError, RuntimeError, FloatingPointError):  # WeightWatcher reports -1 when its fit fails
        values = (-1, -1, -1, -1, -1, -1)
    num_spikes, sigma_mp, softrank, bulk_min, bulk_max, scale = values
    if prefix:
        return {"rand_num_spikes": num_spikes, "num_traps": num_spikes, "rand_sigma_mp": sigma_mp,
                "rand_mp_softrank": softrank, "rand_W_scale": scale, "rand_bulk_max": bulk_max,
                "rand_bulk_min": bulk_min}
    return {"num_spikes": num_spikes, "sigma_mp": sigma_mp, "mp_softrank": softrank, "W_scale": scale,
            "bulk_max": bulk_max, "bulk_min": bulk_min}


def _random_columns(evals, layer, rand_evals, rand_once) -> dict:
    """apply_random_esd's columns and the MP fit of the shuffled ESD."""
    from scipy import stats

    m = (np.asarray(evals) + rand_once) / 2
    row = {"max_rand_eval": float(np.max(rand_evals)),
           "rand_distance": float(np.sqrt((stats.entropy(evals, m) + stats.entropy(rand_once, m)) / 2)),
           "ww_softrank": float(np.max(rand_once) / np.max(evals)),
           "ww_maxdist": float(np.max(evals) - np.max(rand_once))}
    row.update(_mp_columns(rand_evals, layer, "rand_"))
    return row


def _norm_columns(evals, alpha, N) -> dict:
    """apply_norm_metrics' columns."""
    norm = np.sum(evals)
    spectral_norm = np.max(evals)
    log_spectral_norm = np.log10(spectral_norm)
    sv = np.sqrt(evals)
    rank = _matrix_rank(sv, N)
    p = sv * sv / np.sum(sv * sv) + EPSILON
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(p * np.log(p)) / np.log(rank + EPSILON)
        log_alpha_norm = np.log10(np.sum(evals ** alpha))
    return {"norm": norm, "log_norm": np.log10(norm), "spectral_norm": spectral_norm,
            "log_spectral_norm": log_spectral_norm, "alpha_weighted": alpha * log_spectral_norm,
            "log_alpha_norm": log_alpha_norm, "stable_rank": norm / spectral_norm, "matrix_rank": rank,
            "entropy": entropy}
