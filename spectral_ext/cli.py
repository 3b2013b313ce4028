"""The `spectral-ext` command (also `python -m spectral_ext`).

    spectral-ext info       what was compiled in, devices
    spectral-ext selfcheck  every operator against its reference, on every device
    spectral-ext bench      the benchmark suite with native-versus-reference ratios
    spectral-ext demo       the main job (see README)
    spectral-ext svr MODEL_OR_CHECKPOINT --arch ... [--plot out.png]
    spectral-ext zoo DIR --arch ... --metrics rank,alpha,svr [--pairs cka --probe x.pt] --out results/
    spectral-ext zoo DIR --metrics rank,alpha --out results/   no --arch: Hugging Face model folders, LoRA
                            adapters, safetensors and torch state_dicts read as their weights alone
    spectral-ext make-zoo OUT --n 1000   a trained Small-CNN-Zoo on digits; then `spectral-ext zoo OUT`

Exit codes: 0 success, 1 a check failed, 2 bad command line, 3 bad input
(missing path, unknown architecture, unusable checkpoint).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch


def _info(args) -> int:
    import spectral_ext

    info = spectral_ext.build_info()
    info["devices"] = ["cpu"] + [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(json.dumps(info, indent=2))
    return 0


def _selfcheck(args) -> int:
    """Each operator against spectral_ext.reference in float64 on random input,
    with the time of each path."""
    import spectral_ext as se
    from spectral_ext import reference

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failed = 0
    print(f"{'operator':<28}{'device':<8}{'max |native - reference|':>26}{'native ms':>12}{'reference ms':>14}")
    for device in devices:
        g = torch.Generator().manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

        U, V = randn(8, 64, 64), randn(8, 64, 9, 64)
        x, W, s = randn(16, 32, 24, 24), randn(288, 32), randn(32).abs()
        P = randn(64, 64, 64).abs() + 0.01
        X = randn(512, 64, 9)
        cases = [
            ("conv_adjacency", lambda: se.conv_adjacency(U, V), lambda: reference.conv_adjacency(U, V)),
            ("signal_projection", lambda: se.signal_projection(x, W, s, padding=1),
             lambda: reference.signal_projection(x, W, s, (1, 1), (1, 1), (1, 1), None, (3, 3))),
            ("signal_projection mean", lambda: se.signal_projection(x, W, s, padding=1, reduce="mean"),
             lambda: reference.signal_projection(x, W, s, (1, 1), (1, 1), (1, 1), "mean", (3, 3))),
            ("sinkhorn", lambda: se.sinkhorn(P, 16), lambda: reference.sinkhorn(P, 16)),
            ("max_kernel_gram", lambda: se.max_kernel_gram(X), lambda: reference.max_kernel_gram(X)),
        ]
        for name, native, ref in cases:
            times = []
            outs = []
            for fn in (native, ref):
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                outs.append(fn())
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            err = (outs[0] - outs[1]).abs().max().item()
            scale = outs[1].abs().max().item() or 1.0
            ok = err <= 1e-10 * scale
            failed += not ok
            print(f"{name:<28}{device:<8}{err:>26.3e}{times[0]:>12.2f}{times[1]:>14.2f}  {'ok' if ok else 'FAIL'}")
    print("all operators agree with the reference" if not failed else f"{failed} operator(s) disagree")
    return 1 if failed else 0


def _bench(args) -> int:
    import pytest

    root = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        print(f"spectral-ext bench: no benchmarks folder at {root} (run from a source checkout)", file=sys.stderr)
        return 2
    return pytest.main(["-q", str(root), *args.pytest_args])


DEMO_LAYERS = ["conv1", "relu1", "conv2", "relu2", "pool", "conv3", "relu3", "flatten", "fc1", "relu4", "fc2"]

DEMO_LEGEND = {
    "previous -> next": "the two linear maps an edge connects (module names)",
    "kind": "conv (conv -> conv), conv_linear (conv -> flatten -> Linear) or fc",
    "K2": "kernel positions (conv) or spatial positions per channel (conv_linear) summed in a coefficient",
    "threshold": "coefficient a random network exceeds with probability p (seed 000 sections 2.4, 4.3)",
    "significant": "fraction of all adjacency coefficients above the threshold",
    "d_out, d_in": "internal dimensions: spectral neurons of next / previous map that carry the edge (section 3.2)",
    "top8 trained / init": "significant coefficients among the top 8 x 8 spectral neurons, trained vs at initialisation",
}


def _demo(args) -> int:
    """Train a small CNN on scikit-learn's digits, print its SVR per edge,
    compare with the same network at initialisation, prune it to its
    internal dimensions, save the figures."""
    import collections
    import copy

    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    import spectral_ext as se
    from spectral_ext import datasets

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = datasets.digits()
    model = torch.nn.Sequential(collections.OrderedDict(zip(DEMO_LAYERS, datasets.digits_cnn())))
    initial = copy.deepcopy(model)
    start = time.perf_counter()
    datasets.train(model, x_train, y_train, epochs=args.epochs, progress=True)
    acc = datasets.accuracy(model, (x_test, y_test))
    print(f"trained a digits CNN in {time.perf_counter() - start:.1f} s: test accuracy {acc:.3f}")
    trained_svr = se.svr(model, x_test[:2], dtype=torch.float64)
    initial_svr = se.svr(initial, x_test[:2], dtype=torch.float64)
    edges = trained_svr.to_frame()
    top = 8
    table = pd.DataFrame({
        "previous -> next": edges["previous"] + " -> " + edges["next"], "kind": edges["kind"],
        "K2": edges["kernel_area"], "threshold": edges["threshold"].round(4),
        "significant": edges["significant_fraction"].round(3),
        "d_out, d_in": [f"{a}, {b}" for a, b in zip(edges["d_out"], edges["d_in"])],
        f"top{top} trained / init": [f"{int(trained_svr.significant(e, top).sum())} / "
                                     f"{int(initial_svr.significant(e, top).sum())}" for e in range(len(edges))]})
    print(f"\nSVR per edge (p = {trained_svr.p}):")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    print("columns:")
    for column, meaning in DEMO_LEGEND.items():
        print(f"  {column:<20} {meaning}")
    ranks = trained_svr.compression_frame("internal")
    compressed = trained_svr.compress("internal")
    print("\npruned to the internal dimensions (each map keeps d_in of its outgoing edge):")
    print(ranks.rename(columns={"factored_parameters": "parameters_as_factors"}).to_string(index=False))
    print(f"parameters of these maps: {int(ranks['parameters'].sum())} dense -> "
          f"{int(ranks['factored_parameters'].sum())} as U_k S_k, V_k^T factors; "
          f"test accuracy {acc:.3f} -> {datasets.accuracy(compressed, (x_test, y_test)):.3f}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained_svr.plot(top=32, title=f"SVR of the trained digits CNN (test accuracy {acc:.2f}), p = {trained_svr.p}"
                     ).savefig(out / "svr_digits_cnn.png", dpi=120)
    initial_svr.plot(top=32, title=f"SVR of the same CNN at initialisation, p = {initial_svr.p}"
                     ).savefig(out / "svr_digits_cnn_init.png", dpi=120)
    trained_svr.plot_adjacency(len(edges) - 1, title="adjacency of the trained CNN's fc1 -> fc2").savefig(
        out / "adjacency_digits_cnn.png", dpi=120)
    print(f"figures: {out / 'svr_digits_cnn.png'} (trained), {out / 'svr_digits_cnn_init.png'} (initial), "
          f"{out / 'adjacency_digits_cnn.png'}")
    return 0


def _load_probe(spec):
    """A probe input: a .pt/.safetensors tensor file, or digits[:N]. ZooError
    (exit 3) for anything unusable."""
    from spectral_ext.zoo import MIN_PROBE, ZooError

    if spec is None:
        return None
    if spec == "digits" or spec.startswith("digits:"):
        from spectral_ext import datasets

        _, _, x_test, y_test = datasets.digits()
        count = spec.partition(":")[2] or "256"
        if not count.isdigit() or not MIN_PROBE <= int(count) <= len(x_test):
            raise ZooError(f"--probe digits:N needs N from {MIN_PROBE} to {len(x_test)} (the digits test set), "
                           f"got {count!r}")
        return x_test[:int(count)], y_test[:int(count)]  # labelled: the stitching measure can use it
    path = pathlib.Path(spec)
    if not path.is_file():
        raise ZooError(f"no such probe file: {path} (or give digits:N)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise ZooError(f"the probe file {path} must hold one tensor, it holds {len(tensors)}")
            tensor = next(iter(tensors.values()))
        else:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
    except ZooError:
        raise
    except Exception as error:  # corrupt files raise many kinds of errors
        reason = " ".join(str(error).split())[:120]
        raise ZooError(f"unreadable probe file {path} ({type(error).__name__}: {reason})") from None
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ZooError(f"the probe file {path} must hold a floating tensor of inputs, it holds "
                       f"{type(tensor).__name__ if not isinstance(tensor, torch.Tensor) else tensor.dtype}")
    return tensor


def _names(option: str):
    """An argparse type: a comma-separated list of non-empty names."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",")]
        if not text.strip() or not all(names):
            raise argparse.ArgumentTypeError(f"{option} must be a comma-separated list of names, got {text!r}")
        return names
    return parse


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    return parse


def _zoo(args) -> int:
    """Every argument is checked (zoo.analyze checks the rest) before any work."""
    from spectral_ext import zoo
    from spectral_ext.zoo.manifest import read_manifest

    if args.out is None:
        try:
            manifest = read_manifest(args.source) if pathlib.Path(args.source).is_dir() else None
        except ValueError as error:
            raise zoo.ZooError(str(error)) from error
        if manifest is None:
            print("spectral-ext zoo: --out is required (only a folder with a zoo.json manifest has a default)",
                  file=sys.stderr)
            raise SystemExit(2)  # as argparse does for a missing argument
        args.out = str(pathlib.Path(args.source) / "analysis")

    probe = _load_probe(args.probe)
    if args.pairs and probe is None:
        raise zoo.ZooError("--pairs needs --probe (a tensor file, or digits:N)")
    metrics = [] if args.metrics == ["none"] else args.metrics  # pair measures only
    tables = zoo.analyze(args.source, arch=args.arch, out=args.out, metrics=metrics, pairs=args.pairs,
                         probe=probe, layers=args.layers, max_pairs=args.max_pairs, generator=args.seed,
                         fmt=args.format, allow_pickle=args.allow_pickle, chunk_size=args.chunk_size,
                         metadata=args.metadata, progress=not args.quiet, report=not args.no_report,
                         workers=args.workers, trust_manifest=args.trust_manifest,
                         example_input=zoo.probe_parts(probe)[0][:1] if probe is not None else None)
    import os

    import pandas as pd

    models = tables["models"]
    errors = models["error"].fillna("").astype(str) if "error" in models else models["model"].iloc[0:0]
    failed = errors[errors != ""]
    if len(models) and len(failed) == len(models):  # nothing was analysed: not a success
        files = models["path"].fillna("").astype(str).map(lambda p: pathlib.Path(p).name + ": ") \
            if "path" in models else pd.Series("", index=models.index)
        reasons = pd.Series([" ".join(e.removeprefix(files[i]).split()) for i, e in failed.items()]).value_counts()
        raise zoo.ZooError(f"every member failed ({len(models)} of {len(models)}); the most common reason "
                           f"({reasons.iloc[0]} of them): {reasons.index[0][:240]}; see "
                           f"{args.out}/models.{args.format}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{len(models)} members ({len(failed)} with errors), {len(tables['layers'])} layer rows, "
              f"{len(tables['pairs'])} pair rows -> {args.out}")
    return 0


def _make_zoo(args) -> int:
    from spectral_ext.zoo.generator import make_digits_zoo

    try:
        checkpoints = [int(c) for c in args.checkpoints.split(",") if c.strip()]
    except ValueError:
        print(f"spectral-ext make-zoo: --checkpoints must be comma-separated epochs, got {args.checkpoints!r}",
              file=sys.stderr)
        return 2
    try:
        table = make_digits_zoo(args.out, n=args.n, epochs=args.epochs, checkpoints=checkpoints, seed=args.seed,
                                group_size=args.group_size, batch_size=args.batch_size, progress=not args.quiet,
                                threads=args.threads).to_frame()
    except ValueError as error:
        print(f"spectral-ext make-zoo: {error}", file=sys.stderr)
        return 2
    last = table[table["epoch"] == table["epoch"].max()]["test_accuracy"]
    print(f"{table['run'].nunique()} models, {len(table)} checkpoints -> {args.out}; final test accuracy: median "
          f"{last.median():.3f}, 10th-90th percentile {last.quantile(0.1):.3f}-{last.quantile(0.9):.3f}")
    return 0


def _measures(args) -> int:
    import pandas as pd

    from .similarity.measure import table

    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(table().to_string(index=False))
    return 0


def _svr(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import spectral_ext as se
    from spectral_ext import zoo

    factory = zoo.resolve_arch(args.arch)
    try:
        model = zoo.load_member(args.model, factory, args.allow_pickle)
    except ValueError as error:
        raise zoo.ZooError(f"{args.model}: {error}") from error
    result = se.svr(model, zoo.probe_parts(_load_probe(args.probe))[0][:1] if args.probe else None, p=args.p)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(result.to_frame().round(4).to_string(index=False))
    if args.plot:
        result.plot(top=args.top).savefig(args.plot, dpi=120)
        print(f"figure: {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spectral-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build information and devices").set_defaults(run=_info)
    sub.add_parser("selfcheck", help="operators against their references").set_defaults(run=_selfcheck)
    bench = sub.add_parser("bench", help="run the benchmark suite")
    bench.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    bench.set_defaults(run=_bench)
    demo = sub.add_parser("demo", help="the main job: the SVR of a CNN trained on digits")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--out", default="out", help="folder for the figures")
    demo.set_defaults(run=_demo)
    svr = sub.add_parser("svr", help="the SVR of one model or checkpoint")
    svr.add_argument("model", help="a checkpoint (.pt/.pth/.safetensors)")
    svr.add_argument("--arch", help="'package.module:function' or a torchvision model name")
    svr.add_argument("--probe", help="an example input file (default: the layer discovery's own)")
    svr.add_argument("--p", type=float, default=0.15)
    svr.add_argument("--top", type=int, default=32)
    svr.add_argument("--plot", help="save the SVR graph figure here")
    svr.add_argument("--allow-pickle", action="store_true", help="allow whole pickled modules (trusted files only)")
    svr.set_defaults(run=_svr)
    sub.add_parser("measures", help="the representational similarity measures (names for --pairs)").set_defaults(
        run=_measures)
    zoo = sub.add_parser("zoo", help="analyse a folder of checkpoints (resumable, torchrun-aware)")
    zoo.add_argument("source", help="a folder of checkpoints: .safetensors, .pt, .pth, .bin files, Hugging Face "
                     "model folders (config.json with model.safetensors, shards and their index, or "
                     "pytorch_model.bin) and PEFT LoRA adapter folders, each folder one member")
    zoo.add_argument("--arch", help="'package.module:function' or a torchvision model name; without it the "
                     "checkpoints are read as their weights alone: rank and alpha only (svr and --pairs need it)")
    zoo.add_argument("--metrics", default=["rank", "alpha"], type=_names("--metrics"),
                     help="comma-separated: rank, alpha, svr; none for pair measures only")
    zoo.add_argument("--pairs", default=[], type=_names("--pairs"), help="comma-separated pair measures: any "
                     "similarity measure by name or spec (cka, cka:kernel=max, procrustes:group=grelu, svcca, "
                     "rsa, mutual_knn:k=5; `spectral-ext measures` lists them) and stitching (needs a labelled "
                     "probe such as digits:256)")
    zoo.add_argument("--probe", help="probe inputs: a tensor file, or digits[:N] as 'digits:256'")
    zoo.add_argument("--layers", type=_names("--layers"), help="comma-separated module names for the pair measures")
    zoo.add_argument("--max-pairs", type=_at_least(1), default=None)
    zoo.add_argument("--seed", type=int, default=0, help="seed of the --max-pairs sample (the generator)")
    zoo.add_argument("--out", help="results folder (an interrupted run resumes there); default SOURCE/analysis "
                     "for a folder with a zoo.json manifest")
    zoo.add_argument("--format", choices=["csv", "parquet"], default="csv")
    zoo.add_argument("--chunk-size", type=_at_least(1), default=None,
                     help="members (default 256, fewer for large checkpoints) or pairs (default 16) per committed chunk")
    zoo.add_argument("--workers", type=_at_least(1), default=None, help="threads reading checkpoints")
    zoo.add_argument("--metadata", help="a table (CSV or Parquet) with a model column, e.g. model, accuracy")
    zoo.add_argument("--no-report", action="store_true", help="tables only: no report.md and figures")
    zoo.add_argument("--allow-pickle", action="store_true", help="allow whole pickled modules (trusted files only)")
    zoo.add_argument("--trust-manifest", action="store_true", help="use the 'module:function' a zoo.json names "
                     "as the architecture (imports and runs that code: trusted folders only; --arch is the other way)")
    zoo.add_argument("--quiet", action="store_true", help="no progress bars")
    zoo.set_defaults(run=_zoo)
    make = sub.add_parser("make-zoo", help="train a zoo of Small-CNN-Zoo networks on digits (resumable)")
    make.add_argument("out", help="the zoo folder (zoo.json, checkpoints/, metadata.parquet and .csv)")
    make.add_argument("--n", type=int, default=1000, help="number of models")
    make.add_argument("--epochs", type=int, default=12)
    make.add_argument("--checkpoints", default="0,1,4,12", help="comma-separated epochs to save (0: initialisation)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--group-size", type=int, default=250, help="models trained at once")
    make.add_argument("--batch-size", type=int, default=32)
    make.add_argument("--threads", type=_at_least(1), default=1, help="torch threads while training (default 1: faster "
                      "than 2 for these small convolutions on a busy machine)")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(run=_make_zoo)
    args = parser.parse_args(argv)
    from spectral_ext.zoo import ZooError

    try:
        return args.run(args)
    except ZooError as error:  # one line: the option at fault first when there is one
        option = f"--{error.argument.replace('_', '-')}: " if getattr(error, "argument", None) else ""
        print(f"spectral-ext {args.command}: {option}{' '.join(str(error).split())}", file=sys.stderr)
        return 3
    except OSError as error:  # a full disk, a folder removed under the run: one line, not a traceback
        print(f"spectral-ext {args.command}: {error}", file=sys.stderr)
        return 3
