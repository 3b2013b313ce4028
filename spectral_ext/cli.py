"""The `spectral-ext` command (also `python -m spectral_ext`).

    spectral-ext info       what was compiled in, devices
    spectral-ext selfcheck  every operator against its reference, on every device
    spectral-ext bench      the benchmark suite with native-versus-reference ratios
    spectral-ext demo       the main job (see README)
    spectral-ext svr MODEL_OR_CHECKPOINT --arch ... [--plot out.png]
    spectral-ext zoo DIR --arch ... --metrics rank,alpha,svr [--pairs cka --probe x.pt] --out results/
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


def _demo(args) -> int:
    """Train a small CNN on scikit-learn's digits, print its SVR per edge,
    compare with the same network at initialisation, save the figures."""
    import copy

    import matplotlib

    matplotlib.use("Agg")
    import spectral_ext as se
    from spectral_ext import datasets

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = datasets.digits()
    model = datasets.digits_cnn()
    initial = copy.deepcopy(model)
    start = time.perf_counter()
    datasets.train(model, x_train, y_train, epochs=args.epochs, progress=True)
    acc = datasets.accuracy(model, x_test, y_test)
    print(f"trained a digits CNN in {time.perf_counter() - start:.1f} s: test accuracy {acc:.3f}")
    trained_svr = se.svr(model, x_test[:2], dtype=torch.float64)
    initial_svr = se.svr(initial, x_test[:2], dtype=torch.float64)
    table = trained_svr.to_frame()
    top = 8
    table[f"significant_top{top}"] = [int(trained_svr.significant(e, top).sum()) for e in range(len(table))]
    table[f"significant_top{top}_at_init"] = [int(initial_svr.significant(e, top).sum())
                                             for e in range(len(table))]
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[["previous", "next", "kind", "kernel_area", "threshold", "significant_fraction", "d_out",
                     "d_in", f"significant_top{top}", f"significant_top{top}_at_init"]].round(4).to_string(index=False))
    compressed = trained_svr.compress("internal")
    print(f"pruned to the internal dimensions: test accuracy {datasets.accuracy(compressed, x_test, y_test):.3f}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained_svr.plot(top=32).savefig(out / "svr_digits_cnn.png", dpi=120)
    initial_svr.plot(top=32).savefig(out / "svr_digits_cnn_init.png", dpi=120)
    trained_svr.plot_adjacency(len(table) - 1).savefig(out / "adjacency_digits_cnn.png", dpi=120)
    print(f"figures: {out / 'svr_digits_cnn.png'} (trained), {out / 'svr_digits_cnn_init.png'} (initial), "
          f"{out / 'adjacency_digits_cnn.png'}")
    return 0


def _load_probe(spec):
    """A probe input: a .pt/.safetensors tensor file, or digits[:N]."""
    if spec is None:
        return None
    if spec.startswith("digits"):
        from spectral_ext import datasets

        count = int(spec.split(":")[1]) if ":" in spec else 256
        _, _, x_test, y_test = datasets.digits()
        return x_test[:count], y_test[:count]  # labelled: the stitching measure can use it
    from spectral_ext.zoo import ZooError

    path = pathlib.Path(spec)
    if not path.exists():
        raise ZooError(f"no such probe file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ZooError(f"the probe file {path} must hold one tensor, it holds {len(tensors)}")
        return next(iter(tensors.values()))
    tensor = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(tensor, torch.Tensor):
        raise ZooError(f"the probe file {path} must hold a tensor")
    return tensor


def _zoo(args) -> int:
    from spectral_ext import zoo
    from spectral_ext.zoo_generator import read_manifest

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
    metrics = [m for m in args.metrics.split(",") if m]
    pairs = [m for m in args.pairs.split(",") if m] if args.pairs else []
    tables = zoo.analyze(args.source, arch=args.arch, out=args.out, metrics=metrics, pairs=pairs, probe=probe,
                         layers=args.layers.split(",") if args.layers else None, max_pairs=args.max_pairs,
                         seed=args.seed, fmt=args.format, allow_pickle=args.allow_pickle,
                         chunk_size=args.chunk_size, metadata=args.metadata, progress=not args.quiet,
                         example_input=zoo.probe_parts(probe)[0][:1] if probe is not None else None)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        models = tables["models"]
        errors = int((models["error"].fillna("").astype(str) != "").sum()) if "error" in models else 0
        print(f"{len(models)} members ({errors} with errors), {len(tables['layers'])} layer rows, "
              f"{len(tables['pairs'])} pair rows -> {args.out}")
    return 0


def _make_zoo(args) -> int:
    from spectral_ext.zoo_generator import make_digits_zoo

    try:
        checkpoints = [int(c) for c in args.checkpoints.split(",") if c.strip()]
    except ValueError:
        print(f"spectral-ext make-zoo: --checkpoints must be comma-separated epochs, got {args.checkpoints!r}",
              file=sys.stderr)
        return 2
    try:
        table = make_digits_zoo(args.out, n=args.n, epochs=args.epochs, checkpoints=checkpoints, seed=args.seed,
                                group_size=args.group_size, batch_size=args.batch_size, progress=not args.quiet,
                                threads=args.threads)
    except ValueError as error:
        print(f"spectral-ext make-zoo: {error}", file=sys.stderr)
        return 2
    last = table[table["epoch"] == table["epoch"].max()]["test_accuracy"]
    print(f"{table['run'].nunique()} models, {len(table)} checkpoints -> {args.out}; final test accuracy: median "
          f"{last.median():.3f}, 10th-90th percentile {last.quantile(0.1):.3f}-{last.quantile(0.9):.3f}")
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
    zoo = sub.add_parser("zoo", help="analyse a folder of checkpoints (resumable, torchrun-aware)")
    zoo.add_argument("source", help="a folder of checkpoints")
    zoo.add_argument("--arch", help="'package.module:function' or a torchvision model name")
    zoo.add_argument("--metrics", default="rank,alpha", help="comma-separated: rank, alpha, svr")
    zoo.add_argument("--pairs", default="", help="comma-separated: cka, grelu_cka, procrustes, grelu_procrustes, "
                     "stitching (needs a labelled probe such as digits:256)")
    zoo.add_argument("--probe", help="probe inputs: a tensor file, or digits[:N] as 'digits:256'")
    zoo.add_argument("--layers", help="comma-separated module names for the pair measures")
    zoo.add_argument("--max-pairs", type=int, default=None)
    zoo.add_argument("--seed", type=int, default=0)
    zoo.add_argument("--out", help="results folder (an interrupted run resumes there); default SOURCE/analysis "
                     "for a folder with a zoo.json manifest")
    zoo.add_argument("--format", choices=["csv", "parquet"], default="csv")
    zoo.add_argument("--chunk-size", type=int, default=16)
    zoo.add_argument("--metadata", help="CSV with columns model, accuracy for the report")
    zoo.add_argument("--allow-pickle", action="store_true", help="allow whole pickled modules (trusted files only)")
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
    make.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1: faster "
                      "than 2 for these small convolutions on a busy machine)")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(run=_make_zoo)
    args = parser.parse_args(argv)
    from spectral_ext.zoo import ZooError

    try:
        return args.run(args)
    except ZooError as error:
        print(f"spectral-ext {args.command}: {error}", file=sys.stderr)
        return 3
