"""The eager dataflow tracer: which linear map feeds which, from one recorded
forward pass of any model that runs eagerly (transformers included), for
layers.discover where torch.fx cannot trace the model (or with
tracer="eager").

How it records. A torch.overrides.TorchFunctionMode sees every torch function,
functional call and tensor method of the forward (x.view, x + y, F.silu,
F.scaled_dot_product_attention, ...), each as one call (what a call does
inside is not seen). Next to every activation it keeps, in a dictionary keyed
weakly by the tensor, the probes of layers._Flow: for each producing map, two
integer tensors of the activation's shape saying which output channel of that
map, and which position, each element derives from (-1 where the producer
does not reach). Forward pre-hooks on the maps (Linear, Conv1d/2d/3d,
transformers' Conv1D) read the probes of a map's input; forward hooks give its
output fresh probes (channel = output channel). A functional call on a map's
weight (F.linear(x, module.weight), F.conv2d, torch.addmm(b, x, weight) of
Conv1D) outside that module counts as the map running. Probes live on the CPU
and are computed from shapes and index arithmetic only, whatever the device of
the activations.

The rules (layers._rule, shared with the fx tracer, and the ones below), each
with its reason:

- Reshapes, views, permutes, transposes, slices, getitem, chunk/split/unbind,
  cat/stack, expand, repeat, repeat_interleave: applied to the probes exactly
  as to the values, so an element keeps the channel it holds wherever it moves.
  Grouped-query attention (a k/v head read by several q heads through
  repeat_kv's expand + reshape, or repeat_interleave) is followed this way: a
  value channel reaches several inputs of the output projection, which the
  connection records as that many taps (rows of shape (channels, n_rep), the
  null dimension the value map's output size).
- Elementwise operations (activations, +, *, residual additions, casts):
  every operand's probes pass, broadcast to the result; a producer reached
  through two operands keeps the first's labels. The gated MLP
  down(act(gate(x)) * up(x)) thus connects both gate and up to down: each
  element of the product is one channel of gate times the same channel of up.
- Normalisation modules (nn.LayerNorm, BatchNorm, GroupNorm, and any leaf
  module whose class name holds "LayerNorm" or "RMSNorm": LlamaRMSNorm,
  Qwen2RMSNorm, ...) and activation modules (nn.ReLU, ..., and leaf modules
  named "...Activation": transformers' NewGELUActivation) are taken whole:
  output probes = input probes. A normalisation divides each token by one
  statistic of all its channels and scales each channel by its own weight: a
  per-token, per-channel scale, no channel reads another (LayerNorm's mean
  subtraction is a rank-one correction common to all channels, ignored as by
  the fx tracer). Taken whole, their inner means and square roots do not end
  the flow.
- Pooling, resizing, means (layers._resize): kept where each output element
  reads one channel, positions renumbered.
- Attention, F.scaled_dot_product_attention(q, k, v): softmax(q k^T) weighs
  tokens, not channels: output channel (head h, dim d) is a token-weighted sum
  of value channel (h, d) only. So the value projection's probes (the same for
  every token) pass to the output, head by head (with enable_gqa, a k/v head
  repeated for its q heads); the query and key projections end in the scores
  (named in stopped_at) and do not reach the output projection.
- Matrix products (matmul, @, bmm; baddbmm and addmm add their input as an
  addition does): the eager attention of transformers
  computes softmax(q k^T) @ v. An operand whose probes are the same along the
  contracted axis (v's tokens) passes to the result: the product mixes its
  rows, not its channels; an operand whose contracted axis holds its channels
  (q @ k^T) ends there.
- Rotary position embeddings (q * cos + rotate_half(q) * sin): rotate_half is
  slices, a negation and a cat (probes move with the values), cos and sin are
  no map's output, so q * cos keeps each channel's label and rotate_half(q) *
  sin carries the partner's label of each rotated pair; the sum keeps the
  first operand's labels. A rotation mixes channels i and i + d/2 within a
  head, but only queries and keys are rotated, and they end in the attention
  scores, so no connection depends on it.
- F.multi_head_attention_forward (nn.MultiheadAttention, torchvision's ViT,
  nn.TransformerEncoderLayer): q, k and v are packed in in_proj_weight (3E,
  E), no module, so its input projection is a map of its own
  (layers.InProjection, "<attention>.in_proj_weight"; with kdim or vdim not
  E, q_proj_weight, k_proj_weight and v_proj_weight, one map each). The
  projection reads query, key and value; the attention, as for
  scaled_dot_product_attention, weighs tokens, not channels, so out_proj's
  input channel (head h, dim d) reads the value row (h, d) only: rows 2E +
  h * E / heads + d of the packed projection, one to one, as pooling passes
  channels through. Its q and k rows end in the scores (named in
  stopped_at); a static_k or static_v given in place of a projection is no
  map's. The call's first result is out_proj's output. torch.fx keeps the
  attention whole, as one module: layers._Flow applies the same rule
  (multi_head_attention_flow), so both tracers give one graph.
- Embeddings (F.embedding of token ids) are no linear map: their output
  carries no probes, and the maps that read it read the model's input.
- x[index] = y writes y's probes into x's; x.copy_(y) gives x y's probes;
  F.pad with a constant pads the probes with -1 (the padding reads no
  channel), the other modes end the flow.
- Fresh tensors made from an activation (x.new_zeros, zeros_like) and
  results that are not floating point (comparisons, argmax, masks) carry no
  probes, silently: they hold no features.
- torch.einsum (MaxViT's attention, "BGHIJ,BGHJD->BGHID"): as a matrix
  product. An operand whose probes are the same along every index it sums
  over (v's tokens J, weighed by attention) passes them to the result,
  moved to the output's indices and broadcast over the others' (I): the
  sum mixes positions, not channels. An operand that sums over differing
  probes (q and k over D) ends there, named. Both tracers apply this
  rule (einsum_probes), so torch.fx and the eager tracer agree.
- Anything else (softmax over channels, a matmul that contracts channels,
  sum over channels, custom kernels) ends the flow and is named in
  ModelGraph.stopped_at; so is a connection whose probes cannot be read
  (layers._connect's errors), with a warning.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from . import layers as _layers

# Names (a function's or method's __name__, underscores stripped) beyond layers._rule's, with their rule.
_EAGER_RULES = {
    **dict.fromkeys((
        "pow", "rsqrt", "sqrt", "exp", "log", "square", "reciprocal", "rsub", "radd", "rmul", "rtruediv", "rdiv",
        "where", "masked_fill", "erf", "type", "half", "bfloat16", "clamp_min", "clamp_max", "maximum", "minimum",
        "rms_norm", "log_sigmoid", "logsigmoid", "data", "sin", "cos", "softsign", "tanhshrink", "hardshrink",
        "softshrink", "threshold", "native_dropout", "feature_dropout", "feature_alpha_dropout",
    ), "pass"),
    **dict.fromkeys((
        "expand", "expand_as", "repeat_interleave", "repeat", "view_as", "reshape_as", "split_with_sizes",
        "tensor_split", "index_select", "flip", "roll", "select", "tile", "T", "mT", "swapdims", "moveaxis",
        "hsplit", "vsplit", "dsplit", "unsafe_split", "unsafe_chunk", "align_as",
    ), "reshape"),
}
_FUNCTIONAL_MAPS = {"linear": (0, 1), "conv1d": (0, 1), "conv2d": (0, 1), "conv3d": (0, 1), "addmm": (1, 2)}
_NORM_NAMES = ("LayerNorm", "RMSNorm")


def _op_name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":  # a property read: x.T, x.mT, x.data, x.shape
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name.strip("_")


def _is_whole_module(module: nn.Module, has_maps: bool) -> bool:
    """A module the tracer takes whole (probes in = probes out): a
    normalisation or activation without linear maps inside."""
    if has_maps:
        return False
    if isinstance(module, _layers._PASSTHROUGH_MODULES):
        return True
    name = type(module).__name__
    leaf = next(iter(module.children()), None) is None
    return leaf and (any(n in name for n in _NORM_NAMES) or name.endswith("Activation"))


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    leaves = tree_flatten(value)[0]
    return next((v for v in leaves if isinstance(v, torch.Tensor)), None)


def _along(chan: torch.Tensor, pos: torch.Tensor, axis: int, shape, heads: bool = False):
    """The probes of an operand whose values are mixed along `axis` (tokens
    weighted by attention, rows of a matrix product) with weights that do not
    depend on the channel: kept where they are the same along that axis,
    broadcast to the result's shape (heads: a k/v head repeated for its query
    heads, grouped-query attention); None where they differ."""
    if chan.dim() < 2 or len(shape) != chan.dim():
        return None
    first = [slice(None)] * chan.dim()
    first[axis] = slice(0, 1)
    c, p = chan[tuple(first)], pos[tuple(first)]
    if not (bool((chan == c).all()) and bool((pos == p).all())):
        return None
    if heads and c.dim() >= 3 and c.shape[-3] != shape[-3] and c.shape[-3] > 0 and shape[-3] % c.shape[-3] == 0:
        n_rep = shape[-3] // c.shape[-3]
        c, p = c.repeat_interleave(n_rep, dim=-3), p.repeat_interleave(n_rep, dim=-3)
    return c.expand(shape).contiguous(), p.expand(shape).contiguous()


class _EagerFlow(TorchFunctionMode):
    def __init__(self, model: nn.Module, maps: dict):
        super().__init__()
        self.maps = maps
        self.flows = WeakIdKeyDictionary()  # activation -> {producer: (channel probe, position probe)}
        self.direct = WeakIdKeyDictionary()  # a map's own output -> the map (for the BatchNorm that reads it)
        self.inputs_of: dict[str, tuple[dict, torch.Size]] = {}
        self.stopped: list[str] = []
        self.depth = 0  # > 0 inside a module taken whole (a map, a normalisation): its inner calls are not followed
        self.pending: list = []
        self.weights = {id(m.module.weight): name for name, m in maps.items()
                        if not nn.utils.parametrize.is_parametrized(*_layers._weight_owner(m.module))}
        self.handles = []
        self.names = {}  # BatchNorm -> its qualified name
        module_of = {m.module: name for name, m in maps.items()}
        with_maps = {prefix for name in maps for prefix in _prefixes(name)}
        for name, module in model.named_modules():
            if module in module_of:
                self.handles.append(module.register_forward_pre_hook(self._map_pre(module_of[module]),
                                                                     with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._map_post(module_of[module])))
            elif name and _is_whole_module(module, name in with_maps):
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    self.names[module] = name
                self.handles.append(module.register_forward_pre_hook(self._whole_pre, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._whole_post))

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # ---- probes of one activation
    def _set(self, tensor, flow: dict, check: bool = True):
        """tensor's probes: `flow`, without the producers it no longer reaches
        (check=False: all reach, as after an elementwise operation)."""
        if not isinstance(tensor, torch.Tensor):
            return
        if check:
            flow = {p: probes for p, probes in flow.items() if bool((probes[0] >= 0).any())}
        if flow:
            self.flows[tensor] = flow
        else:
            self.flows.pop(tensor, None)
        self.direct.pop(tensor, None)

    def _get(self, value) -> dict:
        return self.flows.get(value, {}) if isinstance(value, torch.Tensor) else {}

    # ---- maps
    def _read(self, name: str, x: torch.Tensor):
        self._read_flow(name, dict(self._get(x)), x.shape)

    def _read_flow(self, name: str, flow: dict, shape):
        if name not in self.inputs_of:
            self.inputs_of[name] = (flow, shape)
            return
        seen, first = self.inputs_of[name]
        if first == shape:  # a map run twice: producers it reads on a later call join
            seen.update({p: probes for p, probes in flow.items() if p not in seen})

    def _produce(self, name: str, out):
        if isinstance(out, torch.Tensor):
            self.flows[out] = {name: _layers._canonical(out, self.maps[name].kind)}
            self.direct[out] = name

    def _map_pre(self, name):
        def hook(module, args, kwargs):
            if self.depth == 0:
                x = _first_tensor((args, kwargs))
                if x is not None:
                    self._read(name, x)
            self.depth += 1
        return hook

    def _map_post(self, name):
        def hook(module, args, output):
            self.depth -= 1
            if self.depth == 0:
                self._produce(name, output)
        return hook

    # ---- modules taken whole
    def _whole_pre(self, module, args, kwargs):
        if self.depth == 0:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and tensors and tensors[0] in self.direct:
                owner = self.maps[self.direct[tensors[0]]]
                owner.batchnorm = module
                owner.batchnorm_name = self.names.get(module)
            self.pending.append([dict(self._get(t)) for t in tensors])
        else:
            self.pending.append(None)
        self.depth += 1

    def _whole_post(self, module, args, output):
        self.depth -= 1
        flows = self.pending.pop()
        out = _first_tensor(output)
        if flows is None or out is None:
            return
        try:
            self._set(out, _layers._merge(flows, out.shape), check=False)
        except RuntimeError as error:  # an output the inputs do not broadcast to
            self.flows.pop(out, None)
            if any(flows):
                self.stopped.append(f"{type(module).__name__} ({error})")

    # ---- every torch call
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.depth == 0:
            try:
                self._step(func, args, kwargs, result)
            except Exception as error:  # the probes, never the model, failed: the flow ends here, named
                self.stopped.append(f"{_op_name(func)} (the probes could not follow it: "
                                    f"{type(error).__name__}: {error})")
                if isinstance(result, torch.Tensor):
                    self.flows.pop(result, None)
        return result

    def _step(self, func, args, kwargs, result):
        if _op_name(func) == "multi_head_attention_forward" and self._multi_head_attention(args, kwargs, result):
            return  # its result, (output, None without weights), is no tensor or tuple of tensors
        if not (result is None or isinstance(result, torch.Tensor) or (
                isinstance(result, (tuple, list)) and result and all(isinstance(r, torch.Tensor) for r in result))):
            return  # x.size(), x.dim(), x.item(), ...: numbers, no features flow on
        name = _op_name(func)
        if name in _FUNCTIONAL_MAPS and self._functional_map(name, args, kwargs, result):
            return
        leaves = tree_flatten((args, kwargs))[0]
        flows = [f for t in leaves if isinstance(t, torch.Tensor) and (f := self.flows.get(t))]
        if not flows:
            if isinstance(result, torch.Tensor) and result in self.flows:  # written over in place by no producer
                self._set(result, {})
            return
        producers = list(dict.fromkeys(p for f in flows for p in f))
        if name == "setitem":
            return self._setitem(args, producers)
        if result is None:
            return
        if name.startswith("new_") or name.endswith("_like") or not all(
                r.is_floating_point() or r.is_complex() for r in ((result,) if isinstance(result, torch.Tensor)
                                                                 else result)):
            # x.new_zeros(...), zeros_like(x): a fresh tensor; comparisons, argmax, masks: no features flow on
            for r in (result,) if isinstance(result, torch.Tensor) else result:
                self.flows.pop(r, None)
            return
        if name == "copy":
            self._set(result, _layers._merge([self._get(args[1])], result.shape) if len(args) > 1 else {})
            return
        if name == "scaled_dot_product_attention":
            return self._attention(args, kwargs, result)
        if name in ("matmul", "bmm", "rmatmul", "mm", "baddbmm", "addbmm", "addmm"):
            return self._matmul(name, args, kwargs, result)
        if name == "einsum" and isinstance(result, torch.Tensor) and args and isinstance(args[0], str):
            operands = list(args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])
            out, ended = einsum_probes(args[0], [self._get(t) for t in operands],
                                       [getattr(t, "shape", None) for t in operands], result.shape)
            if ended:
                self.stopped.append(f"einsum (sums over the channels of {', '.join(ended)})")
            self._set(result, out)
            return
        if name == "pad" and (args[2] if len(args) > 2 else kwargs.get("mode", "constant")) == "constant":
            # F.pad with a constant: the padding reads no channel (-1), the rest moves as the values do
            call = lambda *a, **k: func(*a, **{**k, "value": -1})  # noqa: E731
            out = {p: (self._apply(call, args[:2], kwargs, p, 0), self._apply(call, args[:2], kwargs, p, 1))
                   for p in producers}
            self._set(result, out)
            return
        rule = _EAGER_RULES.get(name) or _layers._rule(name, None)
        if rule == "reshape":
            out = {p: (self._apply(func, args, kwargs, p, 0), self._apply(func, args, kwargs, p, 1))
                   for p in producers}
            if isinstance(result, torch.Tensor):
                self._set(result, out)
            else:
                for i, r in enumerate(result):
                    self._set(r, {p: (c[i], q[i]) for p, (c, q) in out.items()})
            return
        if rule == "resize" and isinstance(result, torch.Tensor):
            self._set(result, _layers._resize(lambda p, t: self._apply(func, args, kwargs, p, 0, t), producers,
                                              name, self.stopped))
            return
        if rule == "pass" and isinstance(result, torch.Tensor):
            self._set(result, _layers._merge(flows, result.shape), check=False)
            return
        self.stopped.append(f"{name} ({', '.join(producers[:4])}{', ...' if len(producers) > 4 else ''})")
        for r in (result,) if isinstance(result, torch.Tensor) else result:
            self.flows.pop(r, None)

    def _apply(self, func, args, kwargs, producer, which, transform=None):
        """func run on the probes of `producer` in place of the activations
        (a -1 probe where it does not reach); index and mask tensors as given."""
        def sub(v):
            if not isinstance(v, torch.Tensor):
                return v
            if not (v.is_floating_point() or v.is_complex()):
                return v if v.device.type in ("cpu", "meta") else v.cpu()  # an index or a mask
            probes = self._get(v).get(producer)
            t = probes[which] if probes is not None else torch.full(v.shape, -1, dtype=torch.long)
            return transform(t) if transform is not None else t
        a, k = tree_map(sub, (tuple(args), kwargs))
        return func(*a, **k)

    def _functional_map(self, name, args, kwargs, result) -> bool:
        x_at, w_at = _FUNCTIONAL_MAPS[name]
        keys = ("input", "weight") if name != "addmm" else ("mat1", "mat2")
        x = args[x_at] if len(args) > x_at else kwargs.get(keys[0])
        w = args[w_at] if len(args) > w_at else kwargs.get(keys[1])
        owner = self.weights.get(id(w)) if isinstance(w, torch.Tensor) else None
        if owner is None or self.maps[owner].module.weight is not w or not isinstance(x, torch.Tensor):
            return False
        self._read(owner, x)
        self._produce(owner, result)
        return True

    def _multi_head_attention(self, args, kwargs, result) -> bool:
        """F.multi_head_attention_forward (nn.MultiheadAttention): its input
        projection and out_proj run inside, on the weights passed, by
        multi_head_attention_flow's rule."""
        def arg(i, key):
            return args[i] if len(args) > i else kwargs.get(key)

        w = arg(11, "out_proj_weight")
        owner = self.weights.get(id(w)) if isinstance(w, torch.Tensor) else None
        if owner is None or not isinstance(result, (tuple, list)) or not isinstance(result[0], torch.Tensor):
            return False
        if arg(17, "use_separate_proj_weight"):
            weights = [arg(18, "q_proj_weight"), arg(19, "k_proj_weight"), arg(20, "v_proj_weight")]
        else:
            weights = [arg(5, "in_proj_weight")] * 3
        names = [self.weights.get(id(t)) if isinstance(t, torch.Tensor) else None for t in weights]
        for i, static in ((1, arg(21, "static_k")), (2, arg(22, "static_v"))):
            if static is not None:  # keys or values given, not projected
                names[i] = None
        inputs = [arg(i, key) for i, key in enumerate(("query", "key", "value"))]
        flows = [(dict(self._get(t)), t.shape) if isinstance(t, torch.Tensor) else ({}, None) for t in inputs]
        reads, read_by_out, stop = multi_head_attention_flow(names, flows, w.shape[1], result[0].shape)
        for name, (flow, shape) in reads.items():
            self._read_flow(name, flow, shape)
        self._read_flow(owner, read_by_out, result[0].shape)
        if stop:
            self.stopped.append(stop)
        self._produce(owner, result[0])
        return True

    def _attention(self, args, kwargs, result):
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs.get(names[i]) for i in range(3))
        out = {}
        for p, (c, pos) in self._get(v).items():
            got = _along(c, pos, -2, result.shape, heads=True)
            if got is None:
                self.stopped.append(f"scaled_dot_product_attention (value of {p!r} not the same on every token)")
            else:
                out[p] = got
        ended = [p for t in (q, k) for p in self._get(t) if p not in out]
        if ended:
            self.stopped.append(f"scaled_dot_product_attention (queries and keys end in the scores: "
                                f"{', '.join(dict.fromkeys(ended))})")
        self._set(result, out)

    def _matmul(self, name, args, kwargs, result):
        """a @ b (b @ a for rmatmul); baddbmm, addbmm and addmm add an input
        to the product (bloom's ALiBi bias, an unregistered linear's bias):
        its probes pass as through an addition."""
        added = None
        if name in ("baddbmm", "addbmm", "addmm"):
            added, args = (args[0] if args else kwargs.get("input")), tuple(args[1:])
            args = args + tuple(kwargs[k] for k in ("batch1", "batch2", "mat1", "mat2") if k in kwargs)
        a, b = (args[1], args[0]) if name == "rmatmul" else (args[0], args[1])
        out, ended = {}, []
        if isinstance(b, torch.Tensor) and b.dim() >= 2:
            for p, (c, pos) in self._get(b).items():
                got = _along(c, pos, -2, result.shape)  # b's rows are mixed: kept if each column is one channel
                if got is not None:
                    out[p] = got
        if isinstance(a, torch.Tensor) and a.dim() >= 2:
            for p, (c, pos) in self._get(a).items():
                got = _along(c, pos, -1, result.shape) if p not in out else None
                if got is not None:
                    out[p] = got
        ended = [p for t in (a, b) for p in self._get(t) if p not in out]
        if ended:
            self.stopped.append(f"{name} (contracts the channels of {', '.join(dict.fromkeys(ended))})")
        if isinstance(added, torch.Tensor):
            out.update({p: probes for p, probes in _layers._merge([self._get(added)], result.shape).items()
                        if p not in out})
        self._set(result, out)

    def _setitem(self, args, producers):
        x, index, y = args[0], args[1], args[2] if len(args) > 2 else None
        if not isinstance(x, torch.Tensor):
            return
        index = tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) and v.device.type != "meta" else v, index)
        out = {}
        for p in producers:
            px = self._get(x).get(p)
            py = self._get(y).get(p) if isinstance(y, torch.Tensor) else None
            c = px[0].clone() if px is not None else torch.full(x.shape, -1, dtype=torch.long)
            q = px[1].clone() if px is not None else torch.full(x.shape, -1, dtype=torch.long)
            c[index] = py[0] if py is not None else -1
            q[index] = py[1] if py is not None else -1
            out[p] = (c, q)
        self._set(x, out)


def multi_head_attention_flow(names: list, flows: list, embed_dim: int, out_shape) -> tuple[dict, dict, str | None]:
    """The rule of F.multi_head_attention_forward (see the module's
    docstring), for both tracers. names: the maps projecting q, k and v (one
    name thrice when packed in in_proj_weight; None for a part that no map
    projects); flows: (probes, shape) of query, key and value; out_shape: the
    attention's output, which out_proj reads. Returns what each projection
    reads ({map: (probes, shape)}: a packed one reads query, key and value,
    their producers joined), what out_proj reads ({value map: probes}) and
    the stopped_at entry of the q and k rows (None without)."""
    reads: dict = {}
    for name, (flow, shape) in zip(names, flows):
        if name is None or shape is None:
            continue
        seen = reads.setdefault(name, ({}, shape))[0]
        seen.update({p: probes for p, probes in flow.items() if p not in seen})
    read_by_out = {}
    if names[2] is not None:
        # value row (h, d) of the projection -> out_proj input (h, d): the heads' weighted sums of tokens
        first = 2 * embed_dim if names[2] == names[0] else 0  # packed: the value rows are the last third
        shape = (*out_shape[:-1], embed_dim)
        read_by_out[names[2]] = ((first + torch.arange(embed_dim)).expand(shape).contiguous(),
                                 torch.zeros(shape, dtype=torch.long))
    ended = [n for n in dict.fromkeys(names[:2]) if n is not None]
    stop = f"multi_head_attention_forward (queries and keys end in the scores: {', '.join(ended)})" if ended \
        else None
    return reads, read_by_out, stop


def einsum_probes(equation: str, flows: list, shapes: list, result_shape) -> tuple[dict, list]:
    """The probes of torch.einsum(equation, *operands) (see the module's
    docstring): flows[i] is operand i's {producer: probes} and shapes[i] its
    shape. Returns the result's probes and the producers that end there."""
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not rhs:  # implicit output: the indices that occur once, sorted
        rhs = "".join(sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
    out, ended = {}, []
    for term, flow, shape in zip(terms, flows, shapes):
        for p, (chan, pos) in flow.items():
            if p in out:
                continue
            got = None
            if "." not in term and len(set(term)) == len(term) == chan.dim():  # no ellipsis, no diagonal
                summed = [i for i, c in enumerate(term) if c not in rhs]
                first = tuple(slice(0, 1) if i in summed else slice(None) for i in range(chan.dim()))
                c, q = chan[first], pos[first]
                if bool((chan == c).all()) and bool((pos == q).all()):
                    kept = [ch for ch in term if ch in rhs]
                    c = c.reshape([chan.shape[i] for i, ch in enumerate(term) if ch in rhs])
                    q = q.reshape(c.shape)
                    order = [kept.index(ch) for ch in rhs if ch in kept]
                    view = [chan.shape[term.index(ch)] if ch in kept else 1 for ch in rhs]
                    c, q = c.permute(order).reshape(view), q.permute(order).reshape(view)
                    got = c.expand(result_shape).contiguous(), q.expand(result_shape).contiguous()
            if got is None:
                ended.append(p)
            else:
                out[p] = got
    return out, [p for p in dict.fromkeys(ended) if p not in out]


def _prefixes(name: str):
    """The qualified names of a module's ancestors ("" excluded) and itself."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _one_sample(candidate):
    """The candidate cut to its first sample (the probes need one): a tensor
    or a tuple's tensors by their first axis; a dict's tensors whose first axis
    is the batch (that of its first tensor)."""
    if isinstance(candidate, dict):
        first = next(v for v in candidate.values() if isinstance(v, torch.Tensor))
        batch = first.shape[0] if first.dim() > 0 else 1
        if batch <= 1:
            return candidate
        return {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v
                for k, v in candidate.items()}
    args = candidate if isinstance(candidate, tuple) else (candidate,)
    return tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)


def trace(model: nn.Module, maps: dict, example_input):
    """One forward of `model` on example_input (a tensor, a tuple, a dict of
    keyword inputs) under the eager tracer. Returns the _EagerFlow (inputs_of:
    each map's input probes and shape, stopped); the model's errors propagate."""
    flow = _EagerFlow(model, maps)
    try:
        with torch.no_grad(), flow:
            _layers._call(model, _one_sample(example_input))
    finally:
        flow.remove()
    return flow


def discover_eager(model: nn.Module, maps: dict, candidates: list, made_up: bool = False) -> _layers.ModelGraph:
    """layers.discover's graph from the eager tracer: the first candidate
    input the model runs on. A connection whose probes cannot be read is left
    out, named in stopped_at, with a warning."""
    errors = []
    for candidate in candidates:
        try:
            flow = trace(model, maps, candidate)
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")
            continue
        order = [name for name in flow.inputs_of]
        ordered = {name: maps[name] for name in order}
        ordered.update({name: m for name, m in maps.items() if name not in ordered})  # unused maps last
        connections, unread = [], []
        # A residual stream hands the same probe tensors to every map that reads it (q, k, v, gate, up, the
        # next layers'): the connection is worked out once per probes and shape of reader, then renamed.
        known: dict = {}
        for name in order:
            incoming, shape = flow.inputs_of[name]
            nxt = maps[name]
            for producer, (chan, pos) in incoming.items():
                key = (producer, id(chan), id(pos), nxt.kind, nxt.in_channels, nxt.kernel_size, tuple(shape))
                if key in known:
                    if known[key] is not None:
                        connections.append(_layers._replace(known[key], next=name))
                    continue
                try:
                    connection = _layers._connect(maps[producer], nxt, (chan, pos), shape)
                except ValueError as error:  # not cached: the next reader gets its own message
                    unread.append(str(error))
                    continue
                known[key] = connection
                if connection is not None:
                    connections.append(connection)
        if unread:
            warnings.warn(f"{len(unread)} connection(s) left out, their channels could not be read: {unread[0]}",
                          stacklevel=3)
        return _layers.ModelGraph(ordered, connections, traced=True, stopped_at=flow.stopped + unread,
                                  tracer="eager")
    hint = " (pass example_input)" if made_up else ""
    raise ValueError(f"model did not run on example_input{hint}: {errors[-1]}")
