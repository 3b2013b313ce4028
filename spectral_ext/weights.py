"""A model's weight tensors without its dataflow: the one reader behind every
weight metric (layer_spectra, alpha_hat, the zoo's rank/alpha, the
WeightWatcher adapter on folders).

A source is an nn.Module, a mapping of name -> tensor (a state_dict), or a
path: a .safetensors, .pt, .pth or .bin file, or a folder in the Hugging
Face layout (config.json with model.safetensors, or shards named by
model.safetensors.index.json, or pytorch_model.bin) or a PEFT LoRA adapter
(adapter_config.json with adapter_model.safetensors). Nothing is run: no
input is invented and no forward is traced.

Each tensor considered becomes a WeightTensor: its layer name, its kind, its
shape as an unfolded matrix, and a loader that reads it when asked. Files
are memory-mapped and read one tensor at a time, so reading never holds more
than the tensor in hand (bf16 and fp16 tensors are converted one at a time).

Kinds, and why (seed 001 section 3.1 unfolds a conv weight (out, in, *k) as
W1 = weight.reshape(out, in*k); it says nothing of the kinds below, so each
choice is written here):
- "linear": nn.Linear; transformers' Conv1D (weight stored (in, out): read
  transposed); the q, k, v thirds of nn.MultiheadAttention's packed
  in_proj_weight, each its own map (layer "attn.in_proj_weight[q]"), since
  they are three maps that share no output.
- "conv1d", "conv2d", "conv3d": nn.Conv*; a grouped or depthwise convolution
  is its `groups` diagonal blocks (out/g, in/g*k), whose singular values are
  those of the block-diagonal W1 (the union of the blocks'), never expanded.
- "conv_transpose1d/2d/3d": weight (in, out/g, *k) read as (out, in*k) per
  group: rows are output channels as for a convolution.
- "embedding": nn.Embedding and nn.EmbeddingBag (num_embeddings, dim), and a
  Linear whose weight is an embedding's (a tied output head: a row that names
  the tensor it shares, not analysed twice). Summaries leave embeddings out by
  default: they are lookup tables, not maps between representations.
- "lora": a PEFT LoRA adapter's update (lora_alpha / r) B A per target module
  (lora_alpha / sqrt(r) with use_rslora), the update PEFT adds to the weight.
  WeightWatcher's peft option analyses B A unscaled (compat.weightwatcher
  reproduces that): the same alpha and ranks, lambda_max and norms apart by
  the scale.
- bare tensors (a mapping or a file) take their kind from name and shape: 2-D
  "linear" ("embedding" when the name says so: embed, wte, wpe, shared), 3-5-D
  conv1d/2d/3d (a state_dict does not record groups: a grouped weight is read
  as its (out, in/g * k) unfolding), 1-D and 0-D tensors are skipped (a bias or
  a norm's scale: no spectrum).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

KINDS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
         "embedding", "lora")
ANALYSABLE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_EMBEDDING_NAME = re.compile(r"(^|[._])(embed\w*|wte|wpe|shared|word_embeddings|position_embeddings|"
                             r"token_type_embeddings)([._]|$)")


class WeightError(ValueError):
    """A tensor or a file that cannot be analysed, naming both."""


@dataclass(frozen=True)
class WeightTensor:
    """One weight of a model. layer: the module's qualified name (or the
    tensor's name less ".weight"); kind: see the module docstring; shape: the
    unfolded matrix (out, in * kernel) as the metrics see it; groups: the
    diagonal blocks it is analysed as; source: the tensor's name (and file);
    note: why it is not analysed (then it has no loader); tied_to: the layer
    whose tensor this one is."""
    layer: str
    kind: str
    shape: tuple[int, int]
    groups: int = 1
    source: str = ""
    dtype: torch.dtype | None = None
    note: str = ""
    tied_to: str | None = None
    kernel: tuple[int, ...] = ()
    load: Callable[[], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def analysed(self) -> bool:
        return self.load is not None and not self.note

    @property
    def block_shape(self) -> tuple[int, int]:
        return self.shape[0] // self.groups, self.shape[1] // self.groups

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor as stored."""
        size = torch.empty((), dtype=self.dtype).element_size() if self.dtype is not None else 4
        return self.shape[0] * self.shape[1] // self.groups * size

    def blocks(self, dtype: torch.dtype = torch.float64, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as (groups, out/groups, in/groups * kernel) in `dtype`;
        with `out` (of that shape), converted straight into it (no copy in
        `dtype` beside it)."""
        if self.load is None:
            raise WeightError(f"{self.source or self.layer} is not analysed: {self.note}")
        w = self.load()
        if w.dtype not in ANALYSABLE_DTYPES:
            raise WeightError(f"{self.source or self.layer} is {str(w.dtype).replace('torch.', '')}: quantised or "
                              "integer weights cannot be analysed as they are (dequantise them first)")
        rows, cols = self.block_shape
        if out is not None:
            return out.copy_(w.reshape(self.groups, rows, cols))
        return w.to(dtype).reshape(self.groups, rows, cols)


def read_weights(source, *, name: str = "model") -> list[WeightTensor]:
    """The weight tensors of `source` as WeightTensors.

    In the module's registration order (a module) or the checkpoint's order (the index's order for sharded
    folders). Every tensor of two or more dimensions gets an entry; one that cannot be analysed carries a note
    saying why. Raises WeightError (a ValueError) naming `name` for a source that is none of these, and naming
    the file for an unreadable one.

    Args:
        source: an nn.Module, a mapping name -> tensor, or a path to a file or a folder.
        name: the argument's name in error messages (default "model").

    Returns:
        A list of WeightTensor, one per tensor of two or more dimensions.
    """
    if isinstance(source, nn.Module):
        return _from_module(source)
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"{name} must map names to tensors; {bad[:3]} are not tensors")
        return _from_tensors(list(source.items()), where="")
    if isinstance(source, (str, os.PathLike)):
        return read_path(source, name=name)
    raise TypeError(f"{name} must be an nn.Module, a mapping of name -> tensor, or a path to a checkpoint file or "
                    f"folder, got {type(source).__name__}")


# ---------------------------------------------------------------------------------------------- modules


def _conv_kind(module) -> str | None:
    for kinds, prefix in (((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
                          ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "conv_transpose")):
        if isinstance(module, kinds):
            return f"{prefix}{module.weight.dim() - 2}d" if not _parametrized(module) else \
                f"{prefix}{len(module.kernel_size)}d"
    return None


def _parametrized(module) -> bool:
    return nn.utils.parametrize.is_parametrized(module, "weight")


def _module_weight(module) -> torch.Tensor:
    from .layers import weight_of  # a parametrized weight read without moving its buffers

    return weight_of(module)


def _is_transformers_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers.pytorch_utils.Conv1D


def _from_module(model: nn.Module) -> list[WeightTensor]:
    entries, owner = [], {}  # owner: id of a weight Parameter -> the embedding layer holding it
    for layer, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            owner.setdefault(id(module.weight), layer)
    claimed = set()  # ids of the parameters a layer kind has read
    for layer, module in model.named_modules():
        label = layer or "(model)"
        if isinstance(module, nn.utils.parametrize.ParametrizationList):
            continue  # the original of a parametrized weight: read through its module
        entries.extend(_layer_entries(layer, label, module, owner, claimed))
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in claimed:
                continue
            claimed.add(id(parameter))
            source = f"{layer}.{name}" if layer else name
            shape = tuple(int(d) for d in parameter.shape)
            if parameter.dim() < 2:
                entries.append(WeightTensor(source, "vector", (shape[0] if shape else 1, 1), source=source,
                                            dtype=parameter.dtype,
                                            note="a vector (a bias or a norm's scale): no spectrum"))
            else:
                entries.append(WeightTensor(source, "other", (shape[0], math.prod(shape[1:])), source=source,
                                            dtype=parameter.dtype,
                                            note=f"a {type(module).__name__} parameter: not a layer kind with a "
                                                 "spectrum convention (Linear, Conv, attention, embedding)"))
    return entries


def _layer_entries(layer, label, module, owner, claimed) -> list[WeightTensor]:
    """The entries of a module of a known layer kind (none for other modules); marks their weights claimed."""
    if isinstance(module, nn.MultiheadAttention):
        claimed.update(id(p) for p in (module.in_proj_weight, module.q_proj_weight, module.k_proj_weight,
                                       module.v_proj_weight) if p is not None)
        return _attention_entries(label, module)
    weight = module._parameters.get("weight") if not _parametrized(module) else None
    if weight is not None and id(weight) in claimed and not (id(weight) in owner and owner[id(weight)] != layer):
        return []  # a weight shared with a layer already read
    if weight is not None:
        claimed.add(id(weight))
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        if owner[id(module.weight)] != layer:  # T5's encoder and decoder embed_tokens are its `shared`
            return [WeightTensor(label, "embedding", tuple(int(d) for d in module.weight.shape),
                                 source=f"{layer}.weight", dtype=module.weight.dtype, tied_to=owner[id(module.weight)],
                                 note=f"the same tensor as {owner[id(module.weight)]} (tied)")]
        return [_entry(label, "embedding", module.weight, f"{layer}.weight")]
    if isinstance(module, nn.Linear) or _is_transformers_conv1d(module):
        transposed = _is_transformers_conv1d(module)
        if weight is not None and id(weight) in owner and owner[id(weight)] != layer:
            out, inp = weight.shape[::-1] if transposed else weight.shape
            return [WeightTensor(label, "embedding", (int(out), int(inp)), source=f"{layer}.weight",
                                 dtype=weight.dtype, tied_to=owner[id(weight)],
                                 note=f"the same tensor as {owner[id(weight)]} (a tied output head)")]
        return [_entry(label, "linear", None, f"{layer}.weight", module=module, transposed=transposed)]
    kind = _conv_kind(module)
    if kind is not None:
        return [_entry(label, kind, None, f"{layer}.weight", module=module, groups=module.groups,
                       transpose_conv=kind.startswith("conv_transpose"))]
    if weight is not None:
        claimed.discard(id(weight))  # not a known kind: its parameters get rows of their own
    return []


def _attention_entries(layer: str, module: nn.MultiheadAttention) -> list[WeightTensor]:
    if module.in_proj_weight is not None:
        packed, e = module.in_proj_weight, module.embed_dim
        return [WeightTensor(f"{layer}.in_proj_weight[{part}]", "linear", (e, int(packed.shape[1])),
                             source=f"{layer}.in_proj_weight", dtype=packed.dtype,
                             load=lambda i=i: packed.detach()[i * e:(i + 1) * e])
                for i, part in enumerate("qkv")]
    return [_entry(f"{layer}.{part}_proj_weight", "linear", getattr(module, f"{part}_proj_weight"),
                   f"{layer}.{part}_proj_weight") for part in "qkv"]


def _entry(layer, kind, tensor, source, module=None, transposed=False, groups=1, transpose_conv=False):
    """A WeightTensor of a module's weight (read through the module, so a parametrized one is computed
    when loaded) or of a tensor."""
    shape = tuple(tensor.shape) if tensor is not None else tuple(_module_weight(module).shape) \
        if _parametrized(module) else tuple(module.weight.shape)
    dtype = tensor.dtype if tensor is not None else (module.weight.dtype if not _parametrized(module)
                                                     else _module_weight(module).dtype)

    def load():
        w = tensor.detach() if tensor is not None else _module_weight(module)
        return _standard(w, transposed, groups, transpose_conv)

    out, cols = _matrix_shape(shape, transposed, groups, transpose_conv)
    kernel = tuple(int(k) for k in shape[2:])
    if 0 in shape:
        return WeightTensor(layer, kind, (out, cols), groups, source, dtype, note="a zero-size weight", kernel=kernel)
    return WeightTensor(layer, kind, (out, cols), groups, source, dtype, kernel=kernel, load=load)


def _matrix_shape(shape, transposed=False, groups=1, transpose_conv=False) -> tuple[int, int]:
    if transposed:
        return int(shape[1]), int(shape[0])
    if transpose_conv:  # (in, out/g, *k): out channels are rows
        inp, per_out, k = shape[0], shape[1], math.prod(shape[2:])
        return int(per_out * groups), int(inp * k)
    per_in_cols = math.prod(shape[1:])
    return int(shape[0]), int(per_in_cols * groups)


def _standard(w: torch.Tensor, transposed=False, groups=1, transpose_conv=False) -> torch.Tensor:
    """The weight as rows = outputs, columns = inputs (x kernel), grouped by its diagonal blocks."""
    if transposed:
        return w.T
    if transpose_conv:
        inp, per_out = w.shape[0], w.shape[1]
        k = math.prod(w.shape[2:])
        # (g, in/g, out/g, k) -> (g, out/g, in/g, k): each group's rows are its output channels
        return w.reshape(groups, inp // groups, per_out, k).transpose(1, 2)
    return w.reshape(groups, w.shape[0] // groups, -1)


# ---------------------------------------------------------------------------------------------- bare tensors


def _from_tensors(items: Iterable[tuple[str, torch.Tensor | Callable]], where: str,
                  shapes: dict | None = None, dtypes: dict | None = None) -> list[WeightTensor]:
    """Entries from (name, tensor) pairs, or (name, loader) pairs with their shapes and dtypes given."""
    entries, layers_seen = [], {}
    for key, value in items:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(shapes[key])
        dtype = value.dtype if isinstance(value, torch.Tensor) else dtypes[key]
        source = f"{where}:{key}" if where else key
        layer = key[:-len(".weight")] if key.endswith(".weight") else key
        if layer in layers_seen:  # a layer with two 2-D tensors: keep the tensor names apart
            layer = key
        layers_seen[layer] = True
        loader = (lambda v=value: v.detach()) if isinstance(value, torch.Tensor) else value
        if len(shape) < 2:
            entries.append(WeightTensor(layer, "vector", (int(shape[0]) if shape else 1, 1), source=source,
                                        dtype=dtype, note="a vector (a bias or a norm's scale): no spectrum"))
            continue
        kind = ("embedding" if _EMBEDDING_NAME.search(key) else "linear") if len(shape) == 2 else \
            f"conv{len(shape) - 2}d" if len(shape) <= 5 else None
        if kind is None:
            entries.append(WeightTensor(layer, "other", (int(shape[0]), math.prod(shape[1:])), source=source,
                                        dtype=dtype, note=f"a {len(shape)}-d tensor: no layer kind has that shape"))
            continue
        out, cols = _matrix_shape(shape)
        note = ""
        if dtype not in ANALYSABLE_DTYPES:
            note = f"{str(dtype).replace('torch.', '')}: quantised or integer weights cannot be analysed as they are"
        elif 0 in shape:
            note = "a zero-size weight"
        entries.append(WeightTensor(layer, kind, (out, cols), 1, source, dtype, note=note,
                                    kernel=tuple(int(k) for k in shape[2:]),
                                    load=None if note else (lambda loader=loader: _standard(loader()))))
    return entries


# ---------------------------------------------------------------------------------------------- files and folders


def read_path(path, name: str = "model") -> list[WeightTensor]:
    """read_weights of a checkpoint file or folder (see the module docstring).

    Args:
        path: a checkpoint file or a Hugging Face folder (str or os.PathLike).
        name: the argument's name in error messages (default "model").

    Returns:
        A list of WeightTensor in the checkpoint's order.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: no such file or folder: {path}")
    return _read_file(path)


def checkpoint_files(folder: str) -> list[str] | None:
    """The weight files of a Hugging Face folder in their order (the index's order for shards).

    An unreadable shard index raises WeightError.

    Args:
        folder: the folder's path.

    Returns:
        A list of file paths (joined with folder), or None when the folder holds no known layout.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(folder, index_name)
        if os.path.exists(index_path):
            try:
                with open(index_path) as handle:
                    weight_map = json.load(handle)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise WeightError(f"{index_path}: not a readable shard index ({error})") from error
            return list(dict.fromkeys(os.path.join(folder, f) for f in weight_map.values()))
    for single in ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin"):
        if os.path.exists(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    return None


def _read_folder(folder: str) -> list[WeightTensor]:
    if os.path.exists(os.path.join(folder, "adapter_config.json")):
        return _read_lora(folder)
    files = checkpoint_files(folder)
    if files is None:
        raise WeightError(f"{folder}: no model.safetensors, shard index or pytorch_model.bin (a Hugging Face "
                          "model folder) and no adapter_config.json (a LoRA adapter)")
    index_keys = _index_keys(folder)
    entries = []
    for path in files:
        if not os.path.exists(path):
            raise WeightError(f"{path}: named by the shard index but missing")
        entries.extend(_read_file(path))
    if index_keys is not None:
        found = {e.source.split(":", 1)[1] for e in entries}
        missing = [k for k in index_keys if k not in found]
        if missing:
            raise WeightError(f"{folder}: the shard index names tensors no shard holds: {missing[:3]}")
    if len(files) > 1:  # shards split the model anywhere: one order over all of them
        entries.sort(key=lambda e: natural_key(e.source.split(":", 1)[1]))
    return entries


def _index_keys(folder):
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index_path):
        return None
    with open(index_path) as handle:
        return list(json.load(handle)["weight_map"])


def _read_file(path: str) -> list[WeightTensor]:
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    return _from_tensors(list(_torch_checkpoint(path).items()), where=path)  # a state_dict keeps the model's order


def _torch_checkpoint(path: str) -> dict:
    """A torch state_dict file, loaded weights-only and memory-mapped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many kinds for a file that is not a checkpoint
        raise WeightError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightError(f"{path}: not a state_dict (a mapping of names to tensors)")
    return dict(state)


def _read_safetensors(path: str) -> list[WeightTensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
            shapes, dtypes = {}, {}
            for key in keys:
                info = handle.get_slice(key)
                shapes[key] = info.get_shape()
                dtypes[key] = _SAFETENSORS_DTYPES.get(info.get_dtype(), torch.uint8)
    except (SafetensorError, OSError) as error:
        raise WeightError(f"{path}: not a readable safetensors file ({error})") from error

    def loader(key):
        def load():
            try:
                with safe_open(path, framework="pt") as handle:  # memory-mapped: only this tensor is read
                    return handle.get_tensor(key)
            except (SafetensorError, OSError) as error:
                raise WeightError(f"{path}:{key}: cannot be read ({error})") from error
        return load

    keys = sorted(keys, key=natural_key)  # a file records no layer order: layers.2 before layers.10
    return _from_tensors([(k, loader(k)) for k in keys], where=path, shapes=shapes, dtypes=dtypes)


def natural_key(name: str):
    """Sort key reading the numbers in a name as numbers.

    Args:
        name: the string to sort, such as a tensor name ("layers.10.weight").

    Returns:
        A list of tuples, one per run of digits or non-digits, that compare in natural order.
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def _read_lora(folder: str) -> list[WeightTensor]:
    """A PEFT LoRA adapter: per target module, the update scaling * B A."""
    with open(os.path.join(folder, "adapter_config.json")) as handle:
        config = json.load(handle)
    files = checkpoint_files(folder)
    if not files:
        raise WeightError(f"{folder}: adapter_config.json without adapter_model.safetensors or .bin")
    tensors = {}
    for entry in _read_file(files[0]):
        tensors[entry.source.split(":", 1)[1]] = entry
    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    entries = []
    for key, a in tensors.items():
        match = re.match(r"(.*)\.lora_A(\.[^.]+)?\.weight$", key)
        if not match:
            continue
        target = match.group(1)
        b = tensors.get(f"{target}.lora_B{match.group(2) or ''}.weight")
        layer = re.sub(r"^base_model\.model\.", "", target)
        if b is None:
            entries.append(WeightTensor(layer, "lora", (0, 0), source=a.source, note="lora_A without its lora_B"))
            continue
        r = _pattern_value(rank_pattern, layer, r_default)
        alpha = _pattern_value(alpha_pattern, layer, alpha_default)
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out, inp = b.shape[0], a.shape[1]
        entries.append(WeightTensor(layer, "lora", (out, inp), source=f"{a.source} x lora_B", dtype=a.dtype,
                                    load=lambda a=a, b=b, s=scaling: (b.blocks()[0] @ a.blocks()[0]) * s))
    return entries


def _pattern_value(pattern: dict, layer: str, default):
    for key, value in pattern.items():
        if layer == key or layer.endswith("." + key) or re.fullmatch(key, layer):
            return value
    return default


def release_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim).

    Reading a model tensor by tensor frees a float64 copy per tensor; glibc keeps such freed blocks in its heap
    and the process's resident memory would creep up towards the whole model's (measured: +230 MB for 16
    tensors of 16 MB read one at a time, +54 MB with a trim between them). Does nothing without glibc.

    Args:
        None.

    Returns:
        None.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to trim
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None
