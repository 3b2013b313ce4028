"""The README's API conventions, checked on every public function: the
argument order (model, other, layers, data), the result rule (a dataclass
with .to_frame(), or a plain value) and the pair tables' columns."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing

import pytest
import torch

import spectral_ext as se

MODULES = ("similarity", "rank", "covariance", "spectra", "spectral_neurons", "receptive_fields", "stitching",
           "symmetry", "zoo")
# the relative order of the shared arguments; `layer` and `layers` take the same place
ROLES = {"model": 0, "other": 1, "layer": 2, "layers": 2, "data": 3}
PLAIN = (torch.Tensor, float, int, bool, str, type(None))

# Public functions whose result is none of the above, each with its reason.
TABLE = "its result is the table itself: "
COLLECTION = "one result per model or layer, each following the rule: "
EXCEPTIONS = {
    # tables that are the whole result
    "covariance.weight_spectra": TABLE + "seed 002's spectra, one row per layer and rank (plot.weight_spectra)",
    "rank.mlp_rank_decay": TABLE + "the experiment's curves, one row per layer (seed 003 Fig. 1 d-f)",
    "rank.structural_impetus": TABLE + "the experiment's rows, one per component before and after (Fig. 3)",
    "rank.projection_accuracy": TABLE + "one accuracy per k (classification_dimension's result holds it)",
    "receptive_fields.exemplary_images": TABLE + "the top-k image indices per node",
    "symmetry.rotation_penalties": TABLE + "one RotationPenalty per (layer, trial) as rows",
    "similarity.table": TABLE + "the registered measures (the README's table)",
    "spectra.map_metrics": TABLE + "a building block of layer_spectra and the zoo: rows of metrics per map",
    "spectra.spectrum_metrics": TABLE + "a building block of map_metrics: rows of metrics per spectrum",
    "spectra.weight_metrics": TABLE + "a building block of layer_spectra: rows of metrics per weight",
    "zoo.pair_metrics": TABLE + "the rows of ZooTables.pairs (a pair table, checked below)",
    # several results, each a result of its own
    "spectral_ext.svr_many": COLLECTION + "one SVR per model",
    "receptive_fields.layer_bases": COLLECTION + "{layer: SpectralLayer}",
    "receptive_fields.hypergraph_family": COLLECTION + "{(q, p): Hypergraph}",
    "rank.default_components": COLLECTION + "{name: module}, the inputs of structural_impetus",
    "symmetry.symmetry_classes": "lists of layer names (the classes of a graph's layers)",
    # models, checkpoints and the zoo's plumbing
    "spectral_ext.apply_symmetry": "a new model (and the elements applied): the model is the result",
    "zoo.load_member": "a model",
    "zoo.read_checkpoint": "a state_dict or a module, as the checkpoint holds it",
    "zoo.resolve_arch": "a model factory",
    "zoo.read_member_weights": "the members' weight tensors, one list per member",
    "zoo.list_members": "(name, source) per member of a zoo folder",
    "zoo.check_metadata": "a path (or None)",
    "zoo.check_out": "a path",
    "zoo.write_report": "the report's path",
    "zoo.manifest_defaults": "(source, arch, metadata) filled from the manifest",
    "zoo.read_manifest": "zoo.json's content as a dict",
    "zoo.probe_parts": "(inputs, labels) of a probe",
    # objects and descriptions
    "spectral_ext.svr": "an SVR: a class with .to_frame(), not a dataclass (its adjacencies are made on demand)",
    "spectral_ext.co_svr": "an SVR: a class with .to_frame(), not a dataclass (its adjacencies are made on demand)",
    "spectral_ext.intertwiner_group": "an IntertwinerGroup: the description of a group (kind, scales), no rows",
    "spectral_ext.chain_graph": "a ModelGraph: the dataflow every method takes, not a result",
    "spectral_ext.discover": "a ModelGraph: the dataflow every method takes, not a result",
    "similarity.get_measure": "a Measure object, an argument of the measures' functions",
    "spectra.power_law_convention": "a PowerLawConvention, an argument of the fits",
    "spectral_ext.build_info": "a description of the build (a dict, as torch.__config__)",
    "spectral_neurons.squared_overlap_moments": "a dict of two moments (seed 000's null model)",
    # numpy in, numpy out; operators with their peers' call shapes
    "covariance.marchenko_pastur_density": "a density on numpy's x (for plotting over a histogram)",
    "spectra.alpha_hats": "vectorised over numpy columns of a layer_spectra frame",
    "spectral_ext.linear_sum_assignment": "scipy.optimize.linear_sum_assignment's shape: numpy in, numpy out",
    "spectral_ext.sinkhorn": "return_log=True adds POT's log dict",
    "spectral_ext.use_backend": "a context manager",
}


def _public_functions() -> dict[str, types.FunctionType]:
    """{qualified name: function} of spectral_ext.__all__ and the public names
    of MODULES (their __all__, else the functions they define); a function
    reached twice is kept under its first name."""
    found = {}
    for name in se.__all__:
        value = getattr(se, name)
        if inspect.isfunction(value):
            found.setdefault(value, f"spectral_ext.{name}")
    for module_name in MODULES:
        module = importlib.import_module(f"spectral_ext.{module_name}")
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n, v in vars(module).items()
                     if not n.startswith("_") and inspect.isfunction(v) and v.__module__ == module.__name__]
        for name in names:
            value = getattr(module, name)
            if inspect.isfunction(value):
                found.setdefault(value, f"{module_name}.{name}")
    return {qualified: function for function, qualified in found.items()}


FUNCTIONS = _public_functions()


def _follows_the_result_rule(annotation) -> bool:
    if annotation in PLAIN:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return all(_follows_the_result_rule(a) for a in typing.get_args(annotation))
    if origin is tuple:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return bool(args) and all(_follows_the_result_rule(a) for a in args)
    if not isinstance(annotation, type):
        return False
    if dataclasses.is_dataclass(annotation):
        return callable(getattr(annotation, "to_frame", None))
    import matplotlib.figure
    import networkx

    return issubclass(annotation, (networkx.Graph, matplotlib.figure.Figure))


def test_the_public_functions_are_found():
    assert len(FUNCTIONS) > 80
    for name in ("spectral_ext.similarity_matrix", "spectral_ext.jacobian_partial_rank", "spectral_ext.clip",
                 "similarity.measure_matrix", "rank.pca_dimension", "zoo.analyze"):
        assert name in FUNCTIONS, name
    stale = [name for name in EXCEPTIONS if name not in FUNCTIONS]
    assert not stale, f"exceptions naming no public function: {stale}"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_argument_order(name):
    """model, other, layer(s), data keep that relative order where present, and model comes first."""
    parameters = list(inspect.signature(FUNCTIONS[name]).parameters)
    shared = [p for p in parameters if p in ROLES]
    assert shared == sorted(shared, key=ROLES.get), f"{name}{tuple(parameters)}: the order is {shared}"
    if "model" in parameters:
        assert parameters[0] == "model", f"{name}: model is not the first argument"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_result_rule(name):
    """A public function's return annotation is a dataclass with .to_frame(),
    a tensor, float, int, bool, str, None, a tuple of those, a networkx graph
    or a matplotlib Figure, unless EXCEPTIONS names it with its reason."""
    hints = typing.get_type_hints(FUNCTIONS[name])
    assert "return" in hints, f"{name} has no return annotation"
    if name in EXCEPTIONS:
        return
    assert _follows_the_result_rule(hints["return"]), f"{name} returns {hints['return']}"


def _pair_tables():
    """One small example of each pair table the package makes."""
    from torch import nn

    from spectral_ext import similarity

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=generator)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    reps = {name: torch.randn(24, 5, generator=generator) for name in ("a", "b", "c")}
    pairs = se.zoo.pair_metrics({"m": model, "o": other}, [("m", "o")], x, layers=["1"], measures=("cka",),
                                progress=False)
    return {"similarity_matrix": (se.similarity_matrix(model, other, ["1", "2"], x, progress=False).to_frame(),
                                  "layer"),
            "pairwise_similarity": (se.pairwise_similarity(reps, progress=False).to_frame(), "model"),
            "measure_matrix": (similarity.measure_matrix(reps, "cka").to_frame(), "rep"),
            "zoo.pair_metrics": (pairs, "model")}


def test_every_pair_table_names_its_sides_then_measure_and_value():
    """README "Conventions": <what>_a, <what>_b after what varies, then (the
    zoo's layer,) measure and value."""
    for name, (frame, what) in _pair_tables().items():
        columns = list(frame.columns)
        assert columns[:2] == [f"{what}_a", f"{what}_b"], (name, columns)
        assert columns[-2:] == ["measure", "value"], (name, columns)
        assert set(columns[2:-2]) <= {"layer"}, (name, columns)
        assert frame["measure"].map(type).eq(str).all() and len(frame), name


# The docstring format (Google style): a summary line, prose, "Args:" naming every parameter, "Returns:".
DOC_MODULES = ("plot", "layers", "weights", "datasets", "training", "encoders")


def _documented() -> dict[str, types.FunctionType]:
    found = dict(FUNCTIONS)
    for module_name in DOC_MODULES:
        module = importlib.import_module(f"spectral_ext.{module_name}")
        for name, value in vars(module).items():
            if not name.startswith("_") and inspect.isfunction(value) and value.__module__ == module.__name__:
                found.setdefault(f"{module_name}.{name}", value)
    return found


DOCUMENTED = _documented()


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_docstrings_state_args_and_returns(name):
    function = DOCUMENTED[name]
    doc = inspect.getdoc(function) or ""
    assert doc and doc.splitlines()[0].strip(), f"{name}: no summary line"
    parameters = [p for p in inspect.signature(function).parameters if p != "self"]
    if parameters:
        assert "Args:" in doc, f"{name}: no Args: section"
        args = doc.split("Args:", 1)[1].split("Returns:", 1)[0]
        missing = [p for p in parameters if not any(line.strip().lstrip("*").startswith(p + ":") or
                                                    line.strip().lstrip("*").startswith(p + " ")
                                                    for line in args.splitlines())]
        assert not missing, f"{name}: Args: does not name {missing}"
    assert "Returns:" in doc, f"{name}: no Returns: section"
