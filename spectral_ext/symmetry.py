"""Intertwiner groups of activations and the weight-space symmetries they
induce (seed 004 section 3, Table 1, appendix E.2, E.9)."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from torch import nn

from . import _checks
from ._data import accuracy as _accuracy
from ._data import batches, copy_inputs
from ._hooks import check_model, evaluating, models_in_eval_mode, module_order
from .layers import LINEAR_TYPES, discover, weight_of


def sigma_of_matrix(activation: Callable, A: torch.Tensor) -> torch.Tensor:
    """sigma(A): the activation applied to every entry of A (seed 004 section 3.1).

    Args:
        activation: an elementwise callable on tensors.
        A: a matrix (or any tensor).

    Returns:
        A tensor of A's shape holding sigma(A_ij).
    """
    return activation(A)


def phi(activation: Callable, A: torch.Tensor) -> torch.Tensor:
    """phi_sigma(A) = sigma(A) sigma(I)^-1 (seed 004 section 3.1, Lemma 3.1).

    The matrix with sigma_n o A = phi_sigma(A) o sigma_n for A in the intertwiner group. A ValueError is raised when A
    is not square.

    Args:
        activation: an elementwise callable on tensors (sigma).
        A: a square matrix (n, n).

    Returns:
        The (n, n) matrix phi_sigma(A), of A's dtype and device.
    """
    _checks.tensor("A", A, ndims=(2,), shape="(n, n)")
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be square, got {tuple(A.shape)}")
    identity = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    sigma_identity = sigma_of_matrix(activation, identity)
    return torch.linalg.solve(sigma_identity, sigma_of_matrix(activation, A), left=False)


def _is_generalized_permutation(A: torch.Tensor, atol: float):
    """A = P D: exactly one entry of magnitude > atol per row and per column (seed 004 Theorem E.14)."""
    big = A.abs() > atol
    return bool((big.sum(0) == 1).all()) and bool((big.sum(1) == 1).all())


@dataclass
class IntertwinerGroup:
    """G_sigma_n of an activation (seed 004 section 3.1, Definition 3.2). kind is "general_linear"
    (all of GL_n), "scaled_permutations" (P D) or "permutations" (Sigma_n);
    scales says what D may hold: "any" (non-zero), "positive", "sign"
    ({+-1}) or "one"."""
    name: str
    activation: Callable
    kind: str
    scales: str
    phi_description: str

    def __repr__(self) -> str:
        return f"IntertwinerGroup({self.name}: {self.description})"

    @property
    def description(self) -> str:
        if self.kind == "general_linear":
            return "GL_n (every invertible matrix), phi(A) = A"
        what = {"positive": "P D, D positive diagonal", "sign": "P D, D diagonal with entries +-1",
                "any": "P D, D invertible diagonal", "one": "permutation matrices P"}[self.scales]
        return f"{what}; phi(A) = {self.phi_description}"

    def contains(self, A: torch.Tensor, atol: float = 1e-8) -> bool:
        """Membership test of Table 1 (Theorem E.14: generalized permutations
        whose scales lie in G_sigma_1)."""
        _checks.tensor("A", A, ndims=(2,), shape="(n, n)")
        if A.shape[0] != A.shape[1]:
            return False
        if self.kind == "general_linear":
            return bool(torch.linalg.matrix_rank(A) == A.shape[0])
        if not _is_generalized_permutation(A, atol):
            return False
        d = A[A.abs() > atol]
        if self.scales == "positive":
            return bool((d > 0).all())
        if self.scales == "sign":
            return bool(((d.abs() - 1).abs() <= atol).all())
        if self.scales == "one":
            return bool(((d - 1).abs() <= atol).all())
        return True

    def sample(self, n: int, generator=None, dtype=torch.float64) -> torch.Tensor:
        """A random element (seed 004 section 3.3): a random permutation times
        random admissible scales (lognormal for positive ones). generator:
        None (torch's global RNG), an int seed or a torch.Generator."""
        n = _checks.positive_int("n", n)
        generator = _checks.generator(generator)
        if self.kind == "general_linear":
            return torch.randn(n, n, generator=generator, dtype=dtype) + n ** 0.5 * torch.eye(n, dtype=dtype)
        perm = torch.randperm(n, generator=generator)
        magnitude = torch.exp(torch.randn(n, generator=generator, dtype=dtype))
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
        d = {"positive": magnitude, "sign": sign, "any": sign * magnitude, "one": torch.ones(n, dtype=dtype)}
        return element_matrix(perm, d[self.scales])

    def phi(self, A: torch.Tensor) -> torch.Tensor:
        """phi_sigma(A) by Lemma 3.1's formula sigma(A) sigma(I)^-1."""
        return phi(self.activation, A)


def element_matrix(perm: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The matrix A with (A y)_i = scale[perm[i]] y[perm[i]]: P D with P[i, perm[i]] = 1 and D = diag(scale).

    These are seed 004 section 3.1's generalised permutations.

    Args:
        perm: a permutation of 0..n-1, an integer tensor (n,).
        scale: the diagonal of D, a tensor (n,).

    Returns:
        The (n, n) matrix A, of scale's dtype and device.
    """
    n = perm.numel()
    A = torch.zeros(n, n, dtype=scale.dtype, device=scale.device)
    A[torch.arange(n), perm] = scale[perm]
    return A


_TABLE = {
    "identity": ("general_linear", "any", "A"),
    "sigmoid": ("permutations", "one", "A"),
    "relu": ("scaled_permutations", "positive", "A"),
    "leaky_relu": ("scaled_permutations", "positive", "A"),
    "rbf": ("scaled_permutations", "sign", "abs(A)"),
    "polynomial": ("scaled_permutations", "any", "A^(elementwise d)"),
    "gelu": ("permutations", "one", "A"),
}


def _rbf(x):
    return torch.exp(-x.square() / 2) / math.sqrt(2 * math.pi)


def intertwiner_group(activation, degree: int | None = None, negative_slope: float = 0.01,
                      n_probe: int = 4, generator=None) -> IntertwinerGroup:
    """The intertwiner group of an elementwise activation (seed 004 section 3.1, Definition 3.2, Table 1).

    For an arbitrary elementwise callable the group is computed numerically by the procedure of appendix E.2: Lemma
    E.7's condition that sigma(I) be invertible, then the n = 1 case (which scalars a have sigma(a x) = b sigma(x) for
    all x; by Theorem E.14 the group is then the generalised permutations with those scales).

    Args:
        activation: "identity", "sigmoid", "relu", "leaky_relu" (negative_slope; slope 1 is the identity), "rbf",
            "polynomial" (degree d >= 2), "gelu" (appendix E.2.1), the matching torch.nn modules, or any elementwise
            callable.
        degree: the degree d >= 2 of "polynomial" (default None).
        negative_slope: the slope of "leaky_relu" (default 0.01).
        n_probe: the size n of the sigma(I) whose invertibility (Lemma E.7) is checked for a numerically computed
            group (default 4).
        generator: accepted for the API's one form of randomness (None, an int seed or a torch.Generator); the
            procedure itself draws nothing.

    Returns:
        An IntertwinerGroup.
    """
    negative_slope = _checks.number("negative_slope", negative_slope)
    generator = _checks.generator(generator)
    n_probe = _checks.positive_int("n_probe", n_probe)
    name, act = _resolve(activation, degree, negative_slope)
    if name in _TABLE:
        kind, scales, description = _TABLE[name]
        if name == "leaky_relu" and negative_slope == 1:
            kind, scales, description = _TABLE["identity"]
        return IntertwinerGroup(name, act, kind, scales, description)
    try:
        return _numerical_group(act, n_probe, generator)
    except (RuntimeError, TypeError) as error:  # not a function applied entry by entry
        raise ValueError(f"activation must be an elementwise function of a tensor (torch.relu, nn.GELU(), ...); "
                         f"applying it to probe values failed: {error}") from error


def _resolve(activation, degree, negative_slope):
    if isinstance(activation, str):
        key = activation.lower().replace("-", "_")
        if key == "polynomial":
            if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2:
                raise ValueError(f"the polynomial activation needs an integer degree >= 2, got {degree!r}")
            return key, (lambda x: x ** degree)
        functions = {"identity": lambda x: x, "sigmoid": torch.sigmoid, "relu": torch.relu,
                     "leaky_relu": lambda x: nn.functional.leaky_relu(x, negative_slope), "rbf": _rbf,
                     "gelu": nn.functional.gelu}
        if key not in functions:
            raise ValueError(f"activation must be one of {sorted(_TABLE)}, an nn module or a callable, "
                             f"got {activation!r}")
        return key, functions[key]
    modules = [(nn.Identity, "identity"), (nn.Sigmoid, "sigmoid"), (nn.ReLU, "relu"), (nn.GELU, "gelu")]
    for cls, key in modules:
        if type(activation) is cls:
            return key, activation
    if type(activation) is nn.LeakyReLU:
        return ("leaky_relu" if activation.negative_slope != 1 else "identity"), activation
    if callable(activation):
        return None, activation
    raise TypeError(f"activation must be a name, an nn module or a callable, got {type(activation).__name__}")


def _numerical_group(act, n_probe, generator) -> IntertwinerGroup:
    """Seed 004 appendix E.2 done numerically for an arbitrary elementwise sigma."""
    one, zero = float(act(torch.tensor(1.0, dtype=torch.float64))), float(act(torch.tensor(0.0, dtype=torch.float64)))
    if one == zero or math.isclose(one, -(n_probe - 1) * zero):
        raise ValueError(f"sigma(I) is not invertible (Lemma E.7: sigma(1) = {one}, sigma(0) = {zero}), so the "
                         "intertwiner group is not defined for this activation")
    x = torch.linspace(-4, 4, 801, dtype=torch.float64)
    fx = act(x)
    if not torch.isfinite(fx).all():
        raise ValueError("the activation is not finite on [-4, 4]")
    if torch.allclose(fx, fx[0].expand_as(fx)):
        raise ValueError("the activation is constant: Theorem E.14 does not apply")

    def scale_works(a: float) -> bool:  # sigma(a x) = b sigma(x) for one b, in least squares
        fa = act(a * x)
        denominator = float(fx.square().sum())
        b = float((fa * fx).sum()) / denominator
        return bool(torch.allclose(fa, b * fx, atol=1e-9, rtol=1e-7))

    line = x.clone()
    if torch.allclose(fx, (fx[-1] - fx[0]) / (x[-1] - x[0]) * (line - x[0]) + fx[0], atol=1e-9):
        return IntertwinerGroup("numerical", act, "general_linear", "any", "A (sigma is affine)")
    positive = all(scale_works(a) for a in (0.5, 2.0, 3.7))
    negative_one = scale_works(-1.0)
    negative = negative_one and all(scale_works(a) for a in (-0.5, -2.0))
    if positive and negative:
        scales = "any"
    elif positive:
        scales = "positive"
    elif negative_one:
        scales = "sign"
    else:
        scales = "one"
    return IntertwinerGroup("numerical", act, "scaled_permutations" if scales != "one" else "permutations", scales,
                            "sigma(A) sigma(I)^-1")


# ---------------------------------------------------------------------------------------------
# Proposition 3.4 on a whole model


def symmetry_classes(graph) -> list[list[str]]:
    """Producers whose outputs must share one group element: those read by a common consumer.

    These are residual streams and concatenation-free joins (seed 004 Remark 3.6 / appendix E.9.2).

    Args:
        graph: a ModelGraph (from spectral_ext.layers.discover): its maps and connections.

    Returns:
        A list of classes, each a list of producer (map) names; each class and the list are in forward order.
    """
    from networkx.utils import UnionFind

    classes = UnionFind()
    by_consumer: dict[str, list[str]] = {}
    for c in graph.connections:
        by_consumer.setdefault(c.next, []).append(c.previous)
    for producers in by_consumer.values():
        classes.union(*producers)
    order = list(graph.maps)
    members = [sorted(members, key=order.index) for members in classes.to_sets()]
    return sorted(members, key=lambda m: order.index(m[0]))


@models_in_eval_mode
def apply_symmetry(model: nn.Module, elements: dict | None = None, example_input: torch.Tensor | None = None,
                   group: str = "relu", generator=None, check: bool = True,
                   rtol: float = 1e-4, atol: float = 1e-5, progress: bool = True) -> tuple[nn.Module, dict]:
    """Seed 004 section 3.2, Proposition 3.4, applied to every hidden layer of a model.

    The result is a new model computing the same function whose hidden features are transformed by group elements,
    A = P D with P a permutation and D positive ("relu": G_ReLU, Table 1) or D = 1 ("permutation": any elementwise
    activation). A producer (Linear/Conv) followed by BatchNorm gets the appendix E.9.1 action: its rows and the
    BatchNorm statistics are permuted and the scaling goes to the BatchNorm gain and bias (scaling the conv would be
    normalised away). Consumers get W phi(A)^-1 = W D^-1 P^T on their input columns, including conv -> flatten ->
    Linear. Producers read by one consumer (a residual stream) share one element (Remark 3.6); the model's final maps
    are left alone.

    Args:
        model: the network; it is not changed.
        elements: optional {producer name: (perm, scale)} to impose, with (A y)_i = scale[perm[i]] y[perm[i]];
            unnamed classes get random elements (lognormal scales) drawn from generator.
        example_input: traces the dataflow (default None: the layer discovery's own made-up input).
        group: "relu" (default) or "permutation".
        generator: the random elements (None: torch's global RNG, an int: a seed).
        check: with True (default) the new model is run on example_input and must match the old one, else a
            ValueError says the transformation cannot be applied to this architecture.
        rtol: the relative tolerance of that check (default 1e-4).
        atol: the absolute tolerance of that check (default 1e-5).
        progress: a bar over the transformed maps (default True).

    Returns:
        (new_model, elements) where elements maps every transformed producer to its (perm, scale).
    """
    check_model("model", model)
    if group not in ("relu", "permutation"):
        raise ValueError(f"group must be 'relu' or 'permutation', got {group!r}")
    rtol, atol = _checks.number("rtol", rtol, low=0), _checks.number("atol", atol, low=0)
    generator = _checks.generator(generator)
    if elements is not None and not isinstance(elements, dict):
        raise TypeError(f"elements must be a dict {{producer name: (perm, scale)}}, got {type(elements).__name__}")
    _check_transformable(model)
    graph = discover(model, example_input)
    if example_input is None:
        example_input = _runnable_input(model, graph)
    new = copy.deepcopy(model)
    new_graph = graph.for_model(new)
    classes = symmetry_classes(graph)
    elements = dict(elements or {})
    unknown = [k for k in elements if k not in graph.maps]
    if unknown:
        raise ValueError(f"elements names no linear map of the model: {unknown}")
    chosen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for members in classes:
        sizes = {graph.maps[m].out_channels for m in members}
        if len(sizes) != 1:
            raise ValueError(f"maps {members} feed one consumer with different channel counts {sorted(sizes)}; "
                             "they cannot share a group element")
        n = sizes.pop()
        given = [elements[m] for m in members if m in elements]
        if given:
            perm, scale = (torch.as_tensor(given[0][0]), torch.as_tensor(given[0][1], dtype=torch.float64))
            for other in given[1:]:
                if not (torch.equal(torch.as_tensor(other[0]), perm)
                        and torch.allclose(torch.as_tensor(other[1], dtype=torch.float64), scale)):
                    raise ValueError(f"maps {members} share a residual stream (Remark 3.6) and need one element; "
                                     "elements gives them different ones")
            if sorted(perm.tolist()) != list(range(n)) or scale.shape != (n,) or not bool((scale > 0).all()):
                raise ValueError(f"the element for {members[0]} must be a permutation of {n} channels and "
                                 f"{n} positive scales")
        else:
            perm = torch.randperm(n, generator=generator)
            scale = (torch.exp(torch.randn(n, generator=generator, dtype=torch.float64)) if group == "relu"
                     else torch.ones(n, dtype=torch.float64))
        for m in members:
            chosen[m] = (perm, scale)
    from tqdm.auto import tqdm

    with torch.no_grad():
        for name, (perm, scale) in tqdm(chosen.items(), desc="apply_symmetry", disable=not progress, leave=False):
            _transform_producer(new_graph.maps[name], perm, scale)
        done = set()  # a residual stream reaches a consumer once per producer, through the same columns
        for c in new_graph.connections:
            key = (c.next, tuple(c.rows.reshape(-1).tolist()))
            if c.previous in chosen and key not in done:
                done.add(key)
                _transform_consumer(new_graph.maps[c.next], c, *chosen[c.previous])
    if check:
        with torch.no_grad(), evaluating(model, new):
            before, after = model(copy_inputs(example_input)), new(copy_inputs(example_input))
        if not torch.allclose(before, after, rtol=rtol, atol=atol):
            raise ValueError("apply_symmetry: the transformed model does not compute the same function "
                             f"(max difference {float((before - after).abs().max()):.3g}); the activations "
                             "between these maps are not equivariant under the chosen group (for example "
                             "an activation other than ReLU with group='relu', or a flow that leaves the "
                             "maps through an attention or matmul)")
    return new, chosen


def _check_transformable(model: nn.Module) -> None:
    """Refuse a model holding weights of a kind apply_symmetry does not transform
    (ConvTranspose, recurrent, attention, normalisations other than BatchNorm,
    embeddings...): its channels would keep their order while their neighbours'
    change, and with check=False the twin would be silently wrong, or the twin
    would equal the model because no map around it was seen."""
    for name, module in model.named_modules():
        if nn.utils.parametrize.is_parametrized(module):
            raise ValueError(f"apply_symmetry cannot transform layer {name!r} ({type(module).__name__}): its weight "
                             "is parametrized (spectral_norm, weight_norm, ...) and cannot be written directly")
        if isinstance(module, nn.utils.parametrize.ParametrizationList) or not any(
                True for _ in module.parameters(recurse=False)):
            continue
        if isinstance(module, (*LINEAR_TYPES, nn.modules.batchnorm._BatchNorm)) or (
                isinstance(module, nn.PReLU) and module.num_parameters == 1):  # one slope: G_ReLU-equivariant
            continue
        raise ValueError(f"apply_symmetry cannot transform layer {name!r} ({type(module).__name__}): it handles "
                         "Linear, Conv1d/2d/3d, BatchNorm and parameter-free activations, pooling and reshapes")


def _runnable_input(model: nn.Module, graph) -> torch.Tensor:
    """The first of the layer discovery's made-up inputs that the model runs on (for apply_symmetry's check)."""
    from .layers import _default_input

    with evaluating(model):
        for candidate in _default_input(next(iter(graph.maps.values())), model):
            try:
                with torch.no_grad():
                    model(candidate)
                return candidate
            except Exception:  # the next size may fit
                continue
    raise ValueError("no made-up input runs through the model: pass example_input")


def _groups(module) -> int:
    return getattr(module, "groups", 1)


def _transform_producer(linear_map, perm, scale):
    """W -> A W on the producer's rows (seed 004 Proposition 3.4; with
    BatchNorm after it the appendix E.9.1 action), in place."""
    module = linear_map.module
    if _groups(module) != 1:
        raise ValueError(f"{linear_map.name} is a grouped convolution: its channels cannot be permuted freely")
    weight = module.weight
    s = scale.to(weight.dtype).to(weight.device)[perm]
    bn = linear_map.batchnorm
    factor = torch.ones_like(s) if bn is not None else s  # BatchNorm would normalise a scaling away
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_(weight[perm] * factor.reshape(shape))
    if module.bias is not None:
        module.bias.copy_(module.bias[perm] * factor)
    if bn is not None:
        if bn.running_mean is not None:
            bn.running_mean.copy_(bn.running_mean[perm])
            bn.running_var.copy_(bn.running_var[perm])
        if bn.weight is not None:
            bn.weight.copy_(bn.weight[perm] * s)
            bn.bias.copy_(bn.bias[perm] * s)
        elif not torch.allclose(s, torch.ones_like(s)):
            raise ValueError(f"the BatchNorm after {linear_map.name} has no affine parameters to carry the scaling")


def _transform_consumer(linear_map, connection, perm, scale):
    """W -> W phi(A)^-1 on the consumer's input columns that read the
    producer (seed 004 Proposition 3.4), in place."""
    module = linear_map.module
    if _groups(module) != 1:
        raise ValueError(f"{linear_map.name} is a grouped convolution: its input channels cannot be permuted")
    n = connection.previous_channels
    channels = connection.channels.tolist()
    if sorted(channels) != list(range(n)):
        raise ValueError(f"{linear_map.name} reads only some channels of {connection.previous}; a permutation "
                         "would move channels in and out of what it reads")
    where = {c: k for k, c in enumerate(channels)}
    matrix = module.weight.view(module.weight.shape[0], -1)
    old = matrix.clone()
    s = scale.to(matrix.dtype).to(matrix.device)
    for i in range(n):
        source = int(perm[i])
        matrix[:, connection.rows[where[i]]] = old[:, connection.rows[where[source]]] / s[source]


# ---------------------------------------------------------------------------------------------
# The rotation-penalty experiment (section 3.3, Fig. 4)


class ChannelMap(nn.Module):
    """y -> A y on the channel axis `axis` (1: a 1x1 convolution on (N, C, H,
    W), a Linear on (N, C); -1: a Linear on the features of (N, tokens,
    features)). Given `matrix`, A is that fixed matrix (seed 004 section 3.3's
    transform); the stitching layers (section 4) subclass it and compute A
    from their parameters in matrix()."""

    def __init__(self, matrix: torch.Tensor | None = None, axis: int = 1):
        super().__init__()
        self.axis = axis
        if matrix is not None:
            self.register_buffer("fixed", matrix)

    def matrix(self) -> torch.Tensor:
        return self.fixed

    def map_channels(self, matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """matrix applied to x's channels: (A x)[.., i, ..] = sum_j A[i, j] x[.., j, ..]."""
        return torch.tensordot(x, matrix.to(x.dtype), dims=([self.axis], [1])).movedim(-1, self.axis)

    def forward(self, x):
        return self.map_channels(self.matrix(), x)


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    """Put `module` where the qualified name `name` is (section 3.3 wraps the layer with A)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _labelled_tensors(name, data):
    """All of `data` (any form _data.batches takes, with labels) as one (x, y)
    pair of tensors: the fine-tuning loop draws its own batches from them."""
    pairs = list(batches(data, name=name, labels=True))
    x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name} labels must be an integer tensor of shape ({x.shape[0]},), got {y.dtype} "
                         f"{tuple(y.shape)}")
    return x, y


@dataclass
class RotationPenalty:
    """One run of seed 004 section 3.3's sanity test (Fig. 4): the test
    accuracy before the transform of `layer` and after fine-tuning the later
    layers, and the rotation penalty, before minus after."""
    transform: str
    layer: str
    accuracy_before: float
    accuracy_after: float
    penalty: float

    def to_frame(self) -> pd.DataFrame:
        """One row with a column per field."""
        return pd.DataFrame([asdict(self)])


def rotation_penalty(model: nn.Module, layer: str, data, test_data, transform: str = "grelu",
                     epochs: int = 5, lr: float = 1e-3, batch_size: int = 64, generator=None,
                     progress: bool = True) -> RotationPenalty:
    """Seed 004 section 3.3's sanity test for intertwiners.

    At the pre-activation `layer` (a Linear or Conv) apply A, a random G_ReLU element (lognormal scales) or a random
    orthogonal matrix (Q of a Gaussian's QR), as a fixed channel map; freeze every module up to and including it,
    fine-tune the later ones with Adam on the labelled `data` and measure the accuracy on `test_data`. The model
    itself is not changed (a copy is fine-tuned).

    Args:
        model: the trained network.
        layer: the qualified name of a Linear or Conv module of the model.
        data: labelled training data, any form spectral_ext._data.batches takes.
        test_data: labelled test data, any form spectral_ext._data.batches takes.
        transform: "grelu" (default) or "orthogonal".
        epochs: fine-tuning epochs (default 5).
        lr: the Adam learning rate (default 1e-3).
        batch_size: the fine-tuning batch size (default 64).
        generator: draws A and the batches (None: torch's global RNG, an int: a seed).
        progress: show a progress bar (default True).

    Returns:
        A RotationPenalty.
    """
    if transform not in ("grelu", "orthogonal"):
        raise ValueError(f"transform must be 'grelu' or 'orthogonal', got {transform!r}")
    epochs = _checks.positive_int("epochs", epochs)
    batch_size = _checks.positive_int("batch_size", batch_size)
    lr = _checks.number("lr", lr, low=0, low_open=True)
    g = _checks.generator(generator)
    x_train, y_train = _labelled_tensors("data", data)
    module = dict(model.named_modules()).get(layer)
    if module is None or not isinstance(module, LINEAR_TYPES):  # not hasattr: it would compute a parametrization
        raise ValueError(f"layer must name a Linear or Conv module of the model, got {layer!r}")
    n = weight_of(module).shape[0]
    if transform == "grelu":
        A = intertwiner_group("relu").sample(n, g)
    else:
        A = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    new = copy.deepcopy(model)
    order = module_order(new, x_train[:2])
    if layer not in order:
        raise ValueError(f"layer {layer!r} did not run in the forward pass")
    frozen = set(order[:order.index(layer) + 1])
    _set_submodule(new, layer, nn.Sequential(new.get_submodule(layer), ChannelMap(A)))
    for name, m in new.named_modules():
        if name in frozen or name.startswith(layer + "."):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    from . import datasets

    before = _accuracy(model, test_data, name="test_data")
    trainable = [p for p in new.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"nothing after {layer!r} has parameters to fine-tune")
    seed = int(torch.randint(0, 2 ** 62, (), generator=g))  # the training loop's batches, from the same generator
    datasets.train(new, x_train, y_train, epochs=epochs, lr=lr, batch_size=batch_size, generator=seed,
                   progress=progress, parameters=trainable)
    after = _accuracy(new, test_data, name="test_data")
    return RotationPenalty(transform, layer, before, after, before - after)


def rotation_penalties(model: nn.Module, layers, data, test_data, trials: int = 3, generator=None,
                       progress: bool = True, **kwargs) -> pd.DataFrame:
    """Seed 004 Fig. 4 (section 3.3): rotation_penalty for every layer, both transforms, `trials` runs each.

    All runs draw from one generator; draw the result with spectral_ext.plot.rotation_penalties.

    Args:
        model: the trained network.
        layers: a layer name or a list of them (Linear or Conv modules).
        data: labelled training data, as in rotation_penalty.
        test_data: labelled test data, as in rotation_penalty.
        trials: runs per layer and transform (default 3).
        generator: draws every run (None: torch's global RNG, an int: a seed).
        progress: a bar over the runs (default True).
        **kwargs: passed to rotation_penalty (epochs, lr, batch_size).

    Returns:
        A DataFrame, one row per run: trial, then RotationPenalty's fields (transform, layer, accuracy_before,
        accuracy_after, penalty).
    """
    trials = _checks.positive_int("trials", trials)
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise ValueError("layers is empty")
    g = _checks.generator(generator)
    from tqdm.auto import tqdm

    runs = [(layer, transform, trial) for layer in layers for transform in ("grelu", "orthogonal")
            for trial in range(trials)]
    frames = [rotation_penalty(model, layer, data, test_data, transform, generator=g, progress=False,
                               **kwargs).to_frame().assign(trial=trial)
              for layer, transform, trial in tqdm(runs, desc="rotation penalties", disable=not progress,
                                                  leave=False)]
    frame = pd.concat(frames, ignore_index=True)
    return frame[["trial"] + [c for c in frame.columns if c != "trial"]]
