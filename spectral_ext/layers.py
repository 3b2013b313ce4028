"""Layer discovery: every linear map of a model and how they connect, from the
model's real dataflow (seed 000 sections 2.2 and 4.2).

The model is traced with torch.fx and run once on an example input while
every value also carries two integer *probes* per producing map: for each
element, the producer's output channel it comes from and its spatial position.
Reshapes, flattens, permutes, slices and concatenations are applied to the
probes exactly as to the activations, so a Linear that reads a flattened conv
output learns which of its inputs holds which channel and position, whatever
the order; elementwise operations, activations, normalisation, dropout and
residual additions pass probes through; pooling and resizing keep channels and
renumber positions. Any other operation (a matmul, a softmax, an embedding)
ends the flow. Where fx cannot trace the model (data-dependent control flow,
every transformers model), the eager tracer of spectral_ext.dataflow follows
one forward as it runs, with the same probes and rules and those of attention
(value -> output projection, head by head), gated MLPs and RMSNorm;
discover(tracer="eager") forces it, and tracer="order" chains the maps in the
order they ran (no dataflow, traced=False).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from ._hooks import capturing, set_eval
from ._data import copy_inputs

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

_PASSTHROUGH_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Identity,
)
_RESIZE_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
_PASSTHROUGH_NAMES = {
    "relu", "relu_", "relu6", "leaky_relu", "gelu", "silu", "elu", "selu", "celu", "sigmoid", "tanh",
    "hardswish", "hardsigmoid", "hardtanh", "mish", "softplus", "dropout", "dropout1d", "dropout2d",
    "dropout3d", "alpha_dropout", "batch_norm", "layer_norm", "group_norm", "instance_norm", "add",
    "add_", "sub", "mul", "mul_", "div", "truediv", "iadd", "isub", "imul", "itruediv", "neg", "clamp",
    "clamp_", "abs", "to", "float", "double", "type_as", "stochastic_depth",
}
_RESHAPE_NAMES = {
    "flatten", "view", "reshape", "permute", "transpose", "squeeze", "unsqueeze", "getitem", "t",
    "movedim", "swapaxes", "unflatten", "narrow", "chunk", "split", "unbind",
    "contiguous", "clone", "detach",  # layout matters: a later view needs the probes as contiguous
}
_CONCAT_NAMES = {"cat", "concat", "concatenate", "stack"}
_RESIZE_NAMES = {"interpolate", "upsample", "mean", "amax", "amin"}


def weight_of(module: nn.Module) -> torch.Tensor:
    """module.weight, detached.

    A parametrized weight (spectral_norm) is read with its parametrizations in eval mode: read in train mode,
    spectral_norm runs a power iteration and changes its buffers, and the model would not come back as it was
    given.

    Args:
        module: a module with a weight, or an InProjection.

    Returns:
        The detached weight tensor (an InProjection's: its attention's in_proj_weight or q/k/v_proj_weight).
    """
    owner, parameter = _weight_owner(module)
    if not nn.utils.parametrize.is_parametrized(owner, parameter):
        return getattr(owner, parameter).detach()
    restore = set_eval(owner.parametrizations[parameter])
    try:
        return getattr(owner, parameter).detach()
    finally:
        restore()


def _weight_owner(module: nn.Module) -> tuple[nn.Module, str]:
    """The module that holds a map's weight, and the parameter's name."""
    if isinstance(module, InProjection):
        return module.attention, module.parameter
    return module, "weight"


class InProjection(nn.Module):
    """The input projection of an nn.MultiheadAttention as a map: q, k and v
    stacked in in_proj_weight (3E, E), bias in_proj_bias, used inside
    F.multi_head_attention_forward and so no module of its own (map
    "<attention>.in_proj_weight", whose thirds are weights.py's
    "<attention>.in_proj_weight[q]", "[k]", "[v]"). Where the attention keeps
    them apart (kdim or vdim not E: _qkv_same_embed_dim is False), each of
    q_proj_weight, k_proj_weight, v_proj_weight is a map of its own
    ("<attention>.v_proj_weight"), since they read inputs of other widths.
    A view of the attention's parameters (weight and bias are them, or slices
    of in_proj_bias), not registered in the model."""

    def __init__(self, attention: nn.MultiheadAttention, parameter: str):
        super().__init__()
        self.__dict__["attention"] = attention  # not a submodule: the map belongs to the attention
        self.parameter = parameter

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.attention, self.parameter)

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self.attention.in_proj_bias
        if bias is None or self.parameter == "in_proj_weight":
            return bias
        e, part = self.attention.embed_dim, "qkv".index(self.parameter[0])
        return bias[part * e:(part + 1) * e]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.parameter}, in_features={self.in_features}, out_features={self.out_features}"


def _projections(name: str, attention: nn.MultiheadAttention) -> list[str]:
    """The parameters of an attention's input projection that are maps, with their map names: [q, k, v]
    (one name thrice when packed in in_proj_weight)."""
    prefix = f"{name}." if name else ""
    if attention._qkv_same_embed_dim:
        return [f"{prefix}in_proj_weight"] * 3
    return [f"{prefix}{part}_proj_weight" for part in "qkv"]


def _maps_of(model: nn.Module) -> dict[str, "LinearMap"]:
    """Every linear map of the model, in registration order: its Linear, ConvNd
    and Conv1D modules, and each nn.MultiheadAttention's input projection
    (InProjection) before its out_proj."""
    maps = {}
    for name, module in model.named_modules():
        if _is_map(module):
            maps[name] = _describe(name, module)
        elif isinstance(module, nn.MultiheadAttention):
            for full in dict.fromkeys(_projections(name, module)):
                maps[full] = _describe(full, InProjection(module, full.rpartition(".")[2]))
    return maps


def _map_module(model: nn.Module, name: str, like: nn.Module) -> nn.Module | None:
    """The module of map `name` in `model` (an InProjection of its attention where `like` is one), None
    when absent."""
    if not isinstance(like, InProjection):
        return _submodule(model, name)
    attention = _submodule(model, name.rpartition(".")[0])
    if not isinstance(attention, nn.MultiheadAttention) or getattr(attention, like.parameter, None) is None:
        return None
    return InProjection(attention, like.parameter)


@dataclass
class LinearMap:
    """One linear map of the model (a layer of seed 000 sections 2.2 and 4.2): a Linear or a ConvNd, flattened as
    ``weight.reshape(out, -1)`` (grouped convolutions expanded to the full
    block-structured map)."""

    name: str
    module: nn.Module
    kind: str  # "linear", "conv1d", "conv2d" or "conv3d"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    batchnorm: nn.Module | None = None  # a BatchNorm reading this map's output directly
    batchnorm_name: str | None = None

    @property
    def kernel_area(self) -> int:
        return math.prod(self.kernel_size) if self.kernel_size else 1

    def weight(self, fold_batchnorm: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as (out, in, *kernel), groups expanded, BatchNorm scales
        folded in when asked (seed 000 B.3 compares both)."""
        w = weight_of(self.module)
        w = w.to(dtype) if dtype is not None else w
        groups = getattr(self.module, "groups", 1)
        if groups > 1:
            full = w.new_zeros((self.out_channels, self.in_channels, *self.kernel_size))
            per_in, per_out = self.in_channels // groups, self.out_channels // groups
            for g in range(groups):
                full[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = w[g * per_out:(g + 1) * per_out]
            w = full
        scale = self.batchnorm_scale(w.dtype) if fold_batchnorm else None
        if scale is not None:
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        return w

    def batchnorm_scale(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """gamma / sqrt(running_var + eps) per output channel of the BatchNorm
        that reads this map's output (None without one or without running
        statistics): the factor fold_batchnorm multiplies the rows by."""
        bn = self.batchnorm
        if bn is None or bn.running_var is None:
            return None
        dtype = dtype if dtype is not None else self.module.weight.dtype
        scale = torch.rsqrt(bn.running_var.detach().to(dtype) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(dtype)
        return scale

    def matrix(self, fold_batchnorm: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The SVR flattening (out, in * K2) of seed 000 section 4.2."""
        return self.weight(fold_batchnorm, dtype).reshape(self.out_channels, -1)

    def flattening(self, flattening: str = "svr", fold_batchnorm: bool = False, dtype: torch.dtype | None = None):
        """matrix() ("svr") or co_matrix() ("co-svr"); for a grouped convolution a
        _linalg.BlockDiagonal of its groups diagonal blocks instead (the dense
        map is block-diagonal: its SVD is the blocks', never built densely)."""
        groups = getattr(self.module, "groups", 1)
        if groups == 1:
            return self.matrix(fold_batchnorm, dtype) if flattening == "svr" else self.co_matrix(fold_batchnorm, dtype)
        from ._linalg import BlockDiagonal

        w = weight_of(self.module)  # stored (out, in / groups, *kernel)
        w = w.to(dtype) if dtype is not None else w
        scale = self.batchnorm_scale(w.dtype) if fold_batchnorm else None
        if scale is not None:
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        per_out = self.out_channels // groups
        if flattening == "svr":
            return BlockDiagonal(w.reshape(groups, per_out, -1))
        # co-SVR rows (output channel, kernel position) of a group are contiguous, its columns its inputs
        w = w.reshape(self.out_channels, w.shape[1], -1).permute(0, 2, 1)
        return BlockDiagonal(w.reshape(groups, per_out * self.kernel_area, w.shape[2]))

    def co_matrix(self, fold_batchnorm: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The co-SVR flattening (out * K2, in) of seed 000 sections 4.4 and 5.2.1:
        rows are (output channel, kernel position), columns input channels."""
        w = self.weight(fold_batchnorm, dtype).reshape(self.out_channels, self.in_channels, -1)
        return w.permute(0, 2, 1).reshape(-1, self.in_channels)


@dataclass(frozen=True, eq=False)
class SpectralLayer:
    """One linear map with its SVD, the record every method module shares:
    W = U diag(S) V^T under the flattening of seed 000 section 4.2 (SVR,
    U (out, k), V (in * K2, k)) or 4.4 (co-SVR, U (out * K2, k), V (in, k));
    seed 001 section 4.3 reads V's columns as the signal directions. Columns
    in decreasing singular value, signs by the project's convention. `module`
    is the nn.Module the map belongs to (for its stride, padding, ...)."""

    name: str
    kind: str  # "linear", "conv1d", "conv2d" or "conv3d"
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    module: nn.Module | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return int(self.S.numel())


@dataclass
class Connection:
    """The producer `previous` feeds the consumer `next` (an edge of seed 000's
    SVR graph, sections 2.2 and 4.2).

    ``channels[s]`` is the s-th output channel of `previous` that `next`
    reads, and ``rows[s, z]`` the row of next's flattened input (its right
    singular vectors) that holds that channel at tap z; K2 = rows.shape[1]
    (1 for fully connected, the kernel area for conv, the positions per
    channel for conv -> flatten -> Linear)."""

    previous: str
    next: str
    kind: str  # "fc", "conv" or "conv_linear"
    channels: torch.Tensor
    rows: torch.Tensor
    previous_channels: int
    next_channels: int

    @property
    def kernel_area(self) -> int:
        return int(self.rows.shape[1])

    @property
    def shared(self) -> int:
        return int(self.channels.numel())

    @property
    def null_dimension(self) -> float:
        """n such that a random network's coefficients average 1/n: the shared
        dimension (features for FC, channels for conv); with concatenations or
        splits, previous_channels * next_channels / shared."""
        return self.previous_channels * self.next_channels / self.shared


@dataclass
class ModelGraph:
    """A model's linear maps and how they connect (the layers and edges of
    seed 000's SVR graph, sections 2.2 and 4.2), from discover or
    chain_graph. traced: whether the dataflow was traced (torch.fx), not read
    from the order the maps ran in; stopped_at: what the trace could not follow."""
    maps: dict[str, LinearMap]
    connections: list[Connection]
    traced: bool = True
    stopped_at: list[str] = field(default_factory=list)  # operations that ended a flow
    tracer: str = "fx"  # "fx", "eager" (spectral_ext.dataflow), "order" (execution order) or "registration"

    def for_model(self, model: nn.Module) -> "ModelGraph":
        """The same graph over another model of this architecture (a zoo
        member): its modules, checked to have the same maps, shapes and
        groups. The records are copies with the module swapped (binding a
        zoo member is on the path of every zoo run)."""
        maps = {}
        for name, m in self.maps.items():
            other = _map_module(model, name, m.module)
            if other is None or type(other) is not type(m.module) or weight_of(other).shape != m.module.weight.shape \
                    or getattr(other, "groups", 1) != getattr(m.module, "groups", 1):
                found = "missing" if other is None else f"{type(other).__name__} {tuple(other.weight.shape)}"
                raise ValueError(f"the models cannot be paired: map {name!r} is {type(m.module).__name__} "
                                 f"{tuple(m.module.weight.shape)} in the first model but {found} in this one")
            bn = _submodule(model, m.batchnorm_name) if m.batchnorm_name is not None else None
            maps[name] = _replace(m, module=other, batchnorm=bn)
        return _replace(self, maps=maps)

    def connection(self, previous: str, next: str) -> Connection:
        for c in self.connections:
            if c.previous == previous and c.next == next:
                return c
        raise KeyError(f"no connection from {previous!r} to {next!r}")


def _replace(record, **changes):
    """dataclasses.replace without re-running __init__ (5x faster; these records have no __post_init__)."""
    copy = object.__new__(type(record))
    copy.__dict__.update(record.__dict__, **changes)
    return copy


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """model's submodule by qualified name ("" is the model), None when absent; what named_modules() holds
    under that name, without walking the whole tree (binding a zoo member looks up only its maps)."""
    module = model
    for part in name.split(".") if name else ():
        module = module._modules.get(part)
        if module is None:
            return None
    return module


# ---------------------------------------------------------------- discovery

def _is_conv1d_transposed(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a Linear whose weight is stored
    (in, out), applied as x @ weight + bias."""
    if type(module).__name__ != "Conv1D":
        return False
    weight = module._parameters.get("weight")  # not getattr: under torch.fx tracing that gives a Proxy
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and module.__dict__.get("nf", weight.shape[1]) \
        == weight.shape[1]


def _is_map(module: nn.Module) -> bool:
    """A linear map the methods analyse: Linear, Conv1d/2d/3d, or transformers' Conv1D."""
    return isinstance(module, LINEAR_TYPES) or _is_conv1d_transposed(module)


class TransposedLinearMap(LinearMap):
    """A fully connected map whose module stores its weight transposed, (in,
    out) (transformers' Conv1D): kind "linear", and weight(), matrix() and
    flattening() give the (out, in) matrix as for nn.Linear (a transposed
    view, copied only where a reshape needs it)."""

    def weight(self, fold_batchnorm: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = weight_of(self.module).t()
        w = w.to(dtype) if dtype is not None else w
        scale = self.batchnorm_scale(w.dtype) if fold_batchnorm else None
        return w * scale.unsqueeze(1) if scale is not None else w


def _describe(name: str, module: nn.Module) -> LinearMap:
    if _is_conv1d_transposed(module):
        return TransposedLinearMap(name, module, "linear", module.weight.shape[0], module.weight.shape[1], ())
    if isinstance(module, (nn.Linear, InProjection)):
        return LinearMap(name, module, "linear", module.in_features, module.out_features, ())
    kind = f"conv{len(module.kernel_size)}d"
    return LinearMap(name, module, kind, module.in_channels, module.out_channels, tuple(module.kernel_size))


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    name = getattr(node.target, "__name__", str(node.target))
    return name.lstrip("_")


def _canonical(result: torch.Tensor, kind: str):
    """Channel and position probes of a producer's output."""
    shape = result.shape
    if kind == "linear":  # features last; leading axes are samples or tokens
        chan = torch.arange(shape[-1]).expand(shape).contiguous()
        return chan, torch.zeros(shape, dtype=torch.long)
    spatial = shape[2:]
    chan = torch.arange(shape[1]).reshape(1, -1, *([1] * len(spatial))).expand(shape).contiguous()
    pos = torch.arange(math.prod(spatial)).reshape(1, 1, *spatial).expand(shape).contiguous()
    return chan, pos


def _renumber_positions(chan: torch.Tensor) -> torch.Tensor:
    """Positions as the rank of each element among those of its channel, in
    the order of the first sample (after a resize the old ones mean nothing)."""
    flat = chan[0].reshape(-1)
    order = torch.sort(flat, stable=True).indices
    sorted_chan = flat[order]
    starts = torch.searchsorted(sorted_chan, sorted_chan, side="left")
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel()) - starts
    return rank.reshape(chan.shape[1:]).expand(chan.shape).contiguous()


class _Flow(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, maps: dict[str, LinearMap]):
        super().__init__(gm)
        self.maps = maps
        self.flow: dict[torch.fx.Node, dict] = {}
        self.inputs_of: dict[str, tuple[dict, torch.Size]] = {}
        self.direct: dict[torch.fx.Node, str] = {}
        self.stopped: list[str] = []

    def run_node(self, n):
        result = super().run_node(n)
        self.flow[n] = self._propagate(n, result)
        return result

    def _flows_in(self, n):
        return [a for a in n.all_input_nodes if self.flow.get(a)]

    def _substitute(self, n, producer, which, fill=-1):
        """n's arguments with each flowing tensor replaced by its probe for
        `producer` (a -1 tensor where that producer does not reach)."""
        def unreached(value):
            if isinstance(value, torch.Tensor):
                return torch.full(value.shape, fill, dtype=torch.long)
            if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
                return type(value)(unreached(v) for v in value)  # e.g. the pieces of a chunk
            return value

        def sub(a):
            probes = self.flow.get(a, {}).get(producer)
            if probes is not None:
                return probes[which]
            return unreached(self.env[a])
        return torch.fx.node.map_arg(n.args, sub), torch.fx.node.map_arg(n.kwargs, sub)

    def _apply(self, n, producer, which, transform=None):
        args, kwargs = self._substitute(n, producer, which)
        if transform is not None:
            args, kwargs = torch.fx.node.map_aggregate((args, kwargs), lambda v: transform(v) if isinstance(v, torch.Tensor) else v)
        if n.op == "call_module":
            return self.fetch_attr(n.target)(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)

    def _propagate(self, n, result):
        if n.op in ("placeholder", "get_attr", "output"):
            return {}
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        if module is not None and n.target in self.maps:
            source = n.args[0]
            self.inputs_of[n.target] = (self.flow.get(source, {}), self.env[source].shape)
            self.direct[n] = n.target
            return {n.target: _canonical(result, self.maps[n.target].kind)}
        if isinstance(module, nn.MultiheadAttention) and f"{n.target}.out_proj" in self.maps:
            return self._multi_head_attention(n, module, result)  # its maps run inside, whatever it reads
        inputs = self._flows_in(n)
        if not inputs:
            return {}
        if isinstance(result, torch.Size) or not isinstance(result, (torch.Tensor, tuple, list)) or (
                isinstance(result, (tuple, list)) and not any(isinstance(r, torch.Tensor) for r in result)):
            return {}  # x.size(), x.dim(), ...: numbers, no features flow on
        producers = list(dict.fromkeys(p for a in inputs for p in self.flow[a]))
        name = _op_name(n)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and n.args[0] in self.direct:
            owner = self.maps[self.direct[n.args[0]]]
            owner.batchnorm = module
            owner.batchnorm_name = n.target
        if name == "einsum" and isinstance(result, torch.Tensor) and n.args and isinstance(n.args[0], str):
            from .dataflow import einsum_probes  # the eager tracer's rule: both tracers give one graph

            operands = list(n.args[1]) if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
            out, ended = einsum_probes(n.args[0], [self.flow.get(a, {}) for a in operands],
                                       [getattr(self.env.get(a), "shape", None) for a in operands], result.shape)
            if ended:
                self.stopped.append(f"einsum (sums over the channels of {', '.join(ended)})")
            return out
        rule = _rule(name, module)
        if rule == "reshape":
            return {p: (self._apply(n, p, 0), self._apply(n, p, 1)) for p in producers}
        if rule == "resize":
            if not isinstance(result, torch.Tensor):
                return {}
            return _resize(lambda p, t: self._apply(n, p, 0, transform=t), producers, n.format_node(), self.stopped)
        if rule == "pass":
            if not isinstance(result, torch.Tensor):
                return {}
            return _merge([self.flow[a] for a in inputs], result.shape)
        self.stopped.append(f"{n.format_node()}")
        return {}

    def _multi_head_attention(self, n, module: nn.MultiheadAttention, result):
        """An nn.MultiheadAttention (a leaf for torch.fx) by the eager tracer's
        rule (dataflow.multi_head_attention_flow): its input projection reads
        query, key and value, out_proj reads the value rows head by head, and
        its output is out_proj's."""
        from .dataflow import multi_head_attention_flow

        nodes = [n.args[i] if len(n.args) > i else n.kwargs.get(k) for i, k in enumerate(("query", "key", "value"))]
        names = [p if p in self.maps else None for p in _projections(n.target, module)]
        flows = [(self.flow.get(a, {}), self.env[a].shape) if isinstance(a, torch.fx.Node) else ({}, None)
                 for a in nodes]
        out = result[0] if isinstance(result, (tuple, list)) else result
        reads, read_by_out, stop = multi_head_attention_flow(names, flows, module.embed_dim, out.shape)
        for name, (flow, shape) in reads.items():
            self.inputs_of[name] = (flow, shape)
        out_proj = f"{n.target}.out_proj"
        self.inputs_of[out_proj] = (read_by_out, out.shape)
        if stop:
            self.stopped.append(stop)
        chan, pos = _canonical(out, "linear")
        if not isinstance(result, (tuple, list)):
            return {out_proj: (chan, pos)}
        # the attention weights (a tensor with need_weights) hold no channel: -1
        rest = [torch.full(r.shape, -1, dtype=torch.long) if isinstance(r, torch.Tensor) else r for r in result[1:]]
        return {out_proj: ((chan, *rest), (pos, *rest))}


def _rule(name: str, module: nn.Module | None) -> str | None:
    """How an operation moves the probes (both tracers): "reshape" (applied to
    the probes as to the values: views, permutes, slices, concatenations),
    "resize" (pooling, resizing, means: kept where each output reads one
    channel), "pass" (elementwise: every operand's probes, broadcast) or None
    (the flow ends)."""
    if isinstance(module, _RESHAPE_MODULES) or (module is None and (name in _RESHAPE_NAMES or name in _CONCAT_NAMES)):
        return "reshape"
    if isinstance(module, _RESIZE_MODULES) or (module is None and (name in _RESIZE_NAMES or "pool" in name)):
        return "resize"
    if isinstance(module, _PASSTHROUGH_MODULES) or (module is None and name in _PASSTHROUGH_NAMES):
        return "pass"
    return None


def _merge(flows: list[dict], shape) -> dict:
    """An elementwise operation's probes: each producer's from the first operand
    that carries it, broadcast to the result's shape."""
    merged = {}
    for flow in flows:
        for p, (chan, pos) in flow.items():
            if p not in merged and isinstance(chan, torch.Tensor):
                if chan.shape != shape:
                    chan, pos = chan.expand(shape).contiguous(), pos.expand(shape).contiguous()
                merged[p] = (chan, pos)
    return merged


def _resize(apply, producers, label: str, stopped: list) -> dict:
    """Pooling, resizing, spatial means: channels must survive unmixed.
    apply(producer, transform) runs the operation on that producer's channel
    probe (transformed to double, negated, squared): an output whose value is
    the same channel for all three read one channel only.
    An average over a zero-padded window (AvgPool2d(3, padding=1), whose
    count_include_pad divides by 9 at the border too) scales each output by
    the share w of its window inside the input: every result is divided by w,
    the operation's result on ones, before the comparison, so such a pool
    passes its channels as any pooling does (Inception v3's branch_pool,
    MaxViT's shortcuts)."""
    out = {}
    for p in producers:
        w = apply(p, lambda t: torch.ones(t.shape, dtype=torch.double))
        if not bool((w > 0).all()):
            stopped.append(f"{label} (an output reads no input)")
            continue
        c = apply(p, lambda t: t.double()) / w
        neg = apply(p, lambda t: -t.double()) / w
        sq = apply(p, lambda t: t.double() ** 2) / w
        constant = torch.allclose(c, -neg) and torch.allclose(sq, c * c)
        if not constant:
            stopped.append(f"{label} (mixes channels)")
            continue
        chan = c.round().long()
        out[p] = (chan, _renumber_positions(chan))
    return out


def _default_input(first: LinearMap, model: nn.Module) -> list[torch.Tensor]:
    device = first.module.weight.device
    dtype = first.module.weight.dtype
    if first.kind == "linear":
        return [torch.randn(1, first.in_channels, device=device, dtype=dtype)]
    dims = len(first.kernel_size)
    return [torch.randn(1, first.in_channels, *([size] * dims), device=device, dtype=dtype)
            for size in (32, 224, 28, 8, 64)]


TRACERS = ("auto", "fx", "eager", "order")


def discover(model: nn.Module, example_input=None, tracer: str = "auto") -> ModelGraph:
    """Every linear map of `model` and how they connect (seed 000 sections 2.2 and 4.2).

    Which output channel of a map each input row of the next reads, from one forward pass.

    Args:
        model: an nn.Module; its Linear and Conv1d/2d/3d maps (and transformers' Conv1D, and each
            nn.MultiheadAttention's input projection: the map "<attention>.in_proj_weight", an InProjection), in
            forward order.
        example_input: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (``{"input_ids": ...}``: the model is called as ``model(**example_input)``) for one forward pass
            (default None: for a model whose first map is a Linear a tensor is made up, for a convolutional one
            a few common image sizes are tried).
        tracer: "auto" (default: torch.fx where it traces the model, else the eager tracer of
            spectral_ext.dataflow: one recorded forward as the model runs, any model that runs eagerly; dict
            inputs go to the eager tracer, and so does a model whose maps fx does not all see run while the
            eager tracer sees more), "fx", "eager", or "order" (no dataflow: the maps chained in the order they
            ran, with a warning; traced=False).

    Returns:
        A ModelGraph (maps, connections; tracer says which one ran).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    # eval mode before any weight is read: a parametrized weight (spectral_norm) read in train mode
    # advances its power-iteration buffers, and the model would not come back as it was
    restore = set_eval(model)
    try:
        maps = _maps_of(model)
        if not maps:
            raise ValueError("model has no linear maps (nn.Linear or nn.Conv1d/2d/3d) to analyse")
        empty = [name for name, m in maps.items() if m.module.weight.numel() == 0]
        if empty:
            raise ValueError(f"model has linear maps with a zero-size weight (no spectrum to analyse): {empty}")
        if isinstance(example_input, dict):
            tensors = [a for a in example_input.values() if isinstance(a, torch.Tensor)]
            if not tensors:
                raise ValueError("example_input is a dict without a tensor: nothing to run the model on")
            if any(a.dim() > 0 and a.shape[0] == 0 for a in tensors):
                raise ValueError("example_input holds no sample: its tensors need a batch axis of at least one")
        elif example_input is not None:
            given = example_input if isinstance(example_input, tuple) else (example_input,)
            if any(isinstance(a, torch.Tensor) and (a.dim() == 0 or a.shape[0] == 0) for a in given):
                raise ValueError("example_input holds no sample: its tensors need a batch axis of at least one")
        candidates = ([example_input] if example_input is not None
                      else _default_input(next(iter(maps.values())), model))
        with torch.no_grad():
            if tracer == "order":
                return _discover_with_hooks(model, maps, candidates)
            if tracer == "eager" or (tracer == "auto" and isinstance(example_input, dict)):
                from .dataflow import discover_eager
                return discover_eager(model, maps, candidates, example_input is None)
            if isinstance(example_input, dict):
                raise ValueError("tracer='fx' takes positional inputs (a tensor or a tuple), not a dict")
            try:
                gm = _fx_trace(model)
            except Exception as error:  # fx cannot trace data-dependent control flow, transformers, ...
                if tracer == "fx":
                    raise ValueError(f"torch.fx could not trace the model ({type(error).__name__}: {error}); "
                                     "tracer='auto' or 'eager' follows one eager forward pass instead") from error
                from .dataflow import discover_eager
                return discover_eager(model, maps, candidates, example_input is None)
            errors = []
            inputs = sum(n.op == "placeholder" for n in gm.graph.nodes)
            for candidate in candidates:
                args = candidate if isinstance(candidate, tuple) else (candidate,)
                if len(args) > inputs:  # torch.fx would ignore the extra ones
                    raise ValueError(f"example_input holds {len(args)} inputs but the model's forward takes "
                                     f"{inputs}")
                flow = _Flow(gm, maps)
                try:
                    flow.run(*[a[:1].clone() if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args])
                except Exception as error:
                    errors.append(f"{type(error).__name__}: {error}")
                    continue
                order = [name for name in maps if name in flow.inputs_of]
                if tracer == "auto" and len(order) < len(maps):
                    # maps fx never saw run: their weights are used inside a function fx keeps whole
                    # (torchvision's Swin wraps shifted_window_attention, which calls F.linear on attn.qkv's
                    # weight). The eager tracer sees such calls: its graph, where it runs more of the maps.
                    from .dataflow import discover_eager, trace
                    try:
                        if len(trace(model, maps, candidate).inputs_of) > len(order):
                            return discover_eager(model, maps, [candidate], example_input is None)
                    except Exception:  # the model ran under fx: keep its graph
                        pass
                ordered = {name: maps[name] for name in order}
                ordered.update({name: m for name, m in maps.items() if name not in ordered})  # unused maps last
                connections = []
                for name in order:
                    incoming, shape = flow.inputs_of[name]
                    for producer, probes in incoming.items():
                        connection = _connect(maps[producer], maps[name], probes, shape)
                        if connection is not None:
                            connections.append(connection)
                return ModelGraph(ordered, connections, traced=True, stopped_at=flow.stopped)
            hint = "" if example_input is not None else " (pass example_input)"
            raise ValueError(f"model did not run on example_input{hint}: {errors[-1]}")
    finally:
        restore()


class _MapTracer(torch.fx.Tracer):
    """torch.fx's tracer with transformers' Conv1D kept whole (a call_module
    node, as nn.Linear is), so that it is seen as the map it is."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_conv1d_transposed(m) or super().is_leaf_module(m, qualname)


def _fx_trace(model: nn.Module) -> torch.fx.GraphModule:
    """torch.fx.symbolic_trace(model), with _MapTracer."""
    tracer = _MapTracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _call(model: nn.Module, inputs):
    """model run on a copy of the inputs: a dict as keyword arguments, a tuple as positional ones."""
    inputs = copy_inputs(inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _connect(prev: LinearMap, nxt: LinearMap, probes, input_shape) -> Connection | None:
    chan, pos = probes
    if nxt.kind == "linear":
        # Features are the last axis; every leading index must read the same channels.
        chan2 = chan.reshape(-1, chan.shape[-1])
        pos2 = pos.reshape(-1, pos.shape[-1])
        # Rows the producer does not reach at all (a class token concatenated on the token axis) read nothing.
        reached = (chan2 >= 0).any(1)
        if not bool(reached.any()):
            return None  # the producer's values do not reach this map after all
        chan2, pos2 = chan2[reached], pos2[reached]
        if not bool((chan2 == chan2[0]).all()):
            raise ValueError(f"cannot determine which channel of {prev.name!r} each input of {nxt.name!r} "
                             "reads: the mapping changes along the leading axes")
        c, p = chan2[0], pos2[0]
        features = torch.nonzero(c >= 0).squeeze(1)
        # One sort by (channel, position) groups the features: O(n log n), not a mask per channel.
        key = c[features] * (int(p.max()) + 1 if p.numel() else 1) + p[features]
        features = features[torch.argsort(key, stable=True)]
        channels, counts = torch.unique_consecutive(c[features], return_counts=True)
        if counts.numel() and bool((counts != counts[0]).any()):
            raise ValueError(f"cannot pair {prev.name!r} with {nxt.name!r}: its channels reach "
                             f"{sorted(set(counts.tolist()))} inputs each, not one common number of positions")
        ordered = features.reshape(channels.numel(), -1)
        if not bool((p[ordered] == p[ordered[:1]]).all()):
            raise ValueError(f"cannot pair {prev.name!r} with {nxt.name!r}: channels do not share positions")
        rows = ordered
        kind = "fc" if prev.kind == "linear" else "conv_linear"
        # The Linear's inputs come in groups of K2 positions: its "channels" are in_features / K2.
        return Connection(prev.name, nxt.name, kind, channels, rows, prev.out_channels,
                          nxt.in_channels // rows.shape[1])
    # Conv consumer: the channel axis (1) must carry one producer channel per input channel.
    per_channel = chan[0].reshape(chan.shape[1], -1)
    if not bool((per_channel == per_channel[:, :1]).all()):
        raise ValueError(f"cannot determine the channels of {prev.name!r} that {nxt.name!r} reads: "
                         "its input is not laid out channel-first")
    source = per_channel[:, 0]
    inputs = torch.nonzero(source >= 0).squeeze(1)
    if inputs.numel() == 0:
        return None
    K2 = nxt.kernel_area
    rows = inputs.unsqueeze(1) * K2 + torch.arange(K2)
    kind = "conv" if prev.kind != "linear" else "fc"
    return Connection(prev.name, nxt.name, kind, source[inputs], rows, prev.out_channels, nxt.in_channels)


def _discover_with_hooks(model, maps, candidates) -> ModelGraph:
    """The maps in the order they first ran (a plain capture: only `order` is used). An InProjection is
    no module the model calls: it is listed with the maps that did not run."""
    with capturing(model, [n for n, m in maps.items() if not isinstance(m.module, InProjection)]) as (
            captured, order):
        errors = []
        for candidate in candidates:
            try:
                _call(model, candidate)
                break
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}")
                order.clear()
                captured.clear()
        else:
            raise ValueError(f"model did not run on example_input: {errors[-1]}")
        ran = list(order)
    return _chain(maps, ran, warn=True)


def _chain(maps: dict, order: list[str], warn: bool = False, tracer: str = "order") -> ModelGraph:
    """The maps `order` connected one after the other (no dataflow known): a
    conv feeding a Linear is read flattened channel-major (torch.flatten)."""
    connections = []
    for a, b in zip(order, order[1:]):
        prev, nxt = maps[a], maps[b]
        if nxt.kind == "linear" and prev.kind != "linear":
            per = nxt.in_channels // prev.out_channels
            if per * prev.out_channels != nxt.in_channels:
                raise ValueError(f"cannot pair {a!r} ({prev.out_channels} channels) with {b!r} "
                                 f"({nxt.in_channels} inputs) without the model's dataflow")
            if warn:
                warnings.warn(f"assuming {b!r} reads {a!r} flattened channel-major (torch.flatten order), "
                              "since the model could not be traced", stacklevel=4)
            rows = torch.arange(nxt.in_channels).reshape(prev.out_channels, per)
            kind = "conv_linear"
        else:
            if nxt.in_channels != prev.out_channels:
                raise ValueError(f"cannot pair {a!r} ({prev.out_channels} outputs) with {b!r} "
                                 f"({nxt.in_channels} inputs) without the model's dataflow")
            K2 = nxt.kernel_area
            rows = torch.arange(nxt.in_channels).unsqueeze(1) * K2 + torch.arange(K2)
            kind = "fc" if prev.kind == "linear" else "conv"
        # A Linear after a conv reads P = rows.shape[1] inputs per channel; a conv reads channels.
        next_channels = nxt.in_channels // rows.shape[1] if kind == "conv_linear" else nxt.in_channels
        connections.append(Connection(a, b, kind, torch.arange(prev.out_channels), rows,
                                      prev.out_channels, next_channels))
    ordered = {name: maps[name] for name in order}
    ordered.update({n: m for n, m in maps.items() if n not in ordered})
    return ModelGraph(ordered, connections, traced=False, tracer=tracer)


def chain_graph(model: nn.Module) -> ModelGraph:
    """The graph of a model whose linear maps run one after the other in registration order, without tracing it.

    For nn.Sequential-like models: the SVR authors' convention (the code of seed 000: a list of weights taken as
    the dataflow, conv -> Linear flattened channel-major). Shapes that do not chain raise ValueError.

    Args:
        model: an nn.Module with Linear or Conv1d/2d/3d maps.

    Returns:
        A ModelGraph (maps, connections; tracer "registration").
    """
    maps = _maps_of(model)
    if not maps:
        raise ValueError("model has no linear maps (nn.Linear or nn.Conv1d/2d/3d) to analyse")
    return _chain(maps, list(maps), tracer="registration")
