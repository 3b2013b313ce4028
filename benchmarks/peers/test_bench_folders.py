"""Hugging Face folders vs WeightWatcher 0.7.7 (issue 24): WeightWatcher(model=folder).analyze() against
spectral_ext.compat.weightwatcher's drop-in on the same folder and against spectral_ext's own
spectra.layer_spectra(folder), on random bf16 folders shaped as Qwen2-0.5B (494M parameters, 2 shards)
and TinyLlama-1.1B (1.1B, 5 shards); and a zoo of 16 checkpoints of a small LLaMA (8 layers, 512 / 1376,
59M parameters each): a WeightWatcher loop over the folders against `python -m spectral_ext zoo DIR
--metrics alpha` and against the drop-in in the same loop. The folders come from benchmarks/make_folders.py
(written once into $BENCH_FOLDERS, default <tmp>/spectral_ext_bench_folders, about 5 GB).

Every side runs in its own fresh process (one thread: OMP/MKL/OPENBLAS_NUM_THREADS=1 and
torch.set_num_threads(1)), the sides interleaved (A, B, C, A, B, C, ...; BENCH_FOLDERS_ROUNDS rounds,
default 1); each process reports the seconds of its analysis (after its imports), its peak resident memory
(resource.getrusage ru_maxrss, imports included; and /proc/self/status VmHWM, which is the same unless the
parent was larger when it spawned the child: ru_maxrss keeps that high-water mark across exec, so the
folders are written by a child too) and its resident memory after the imports; the parent times the whole
process too. The analysis seconds are wall-clock; their CPU seconds (time.process_time)
are reported beside them, the steadier figure on a shared machine. The numbers are asserted to agree: the
drop-in's rows are WeightWatcher's (layer_id, name, alpha to 1e-6, lambda_max to 1e-8 relative),
layer_spectra's and the zoo's lambda_max are WeightWatcher's on every layer both analyse (their alpha is
seed 001's fit, another convention).

Run: python -m pytest -q -s --timeout=0 benchmarks/peers/test_bench_folders.py [-k qwen2|tinyllama|zoo]
(WeightWatcher takes about 1.5 min on the Qwen2 folder, 10 min on the TinyLlama one, 2 min on the zoo, one
thread). Marked slow; not part of the test suite (benchmarks/ is outside its testpaths)."""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCHMARKS)
sys.path.insert(0, BENCHMARKS)
import make_folders  # noqa: E402

pytest.importorskip("weightwatcher")
pytest.importorskip("safetensors")
pytestmark = pytest.mark.slow

FOLDERS = os.environ.get("BENCH_FOLDERS", os.path.join(tempfile.gettempdir(), "spectral_ext_bench_folders"))
ROUNDS = int(os.environ.get("BENCH_FOLDERS_ROUNDS", "1"))
TIMEOUT = int(os.environ.get("BENCH_FOLDERS_TIMEOUT", "7200"))  # seconds per process

# One side in a fresh process: argv = side, source, out (a CSV of its table); prints one JSON line.
CHILD = r"""
import contextlib, io, json, os, resource, sys, time, warnings
start = time.perf_counter()
import pandas as pd
import torch
torch.set_num_threads(1)
side, source, out = sys.argv[1:4]
if side in ("weightwatcher", "weightwatcher loop"):
    import weightwatcher as ww
elif side in ("drop-in", "drop-in loop"):
    from spectral_ext.compat import weightwatcher as ww
elif side == "layer_spectra":
    from spectral_ext import spectra
else:
    from spectral_ext import cli

def status_mb(field):
    with open("/proc/self/status") as handle:
        return next(int(l.split()[1]) for l in handle if l.startswith(field + ":")) / 1024

def rss_mb():
    return status_mb("VmRSS")

imported, cpu, base = time.perf_counter(), time.process_time(), rss_mb()
with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if side in ("weightwatcher", "drop-in"):
        frame = ww.WeightWatcher(model=source).analyze()
    elif side in ("weightwatcher loop", "drop-in loop"):
        parts = []
        for name in sorted(os.listdir(source)):
            part = ww.WeightWatcher(model=os.path.join(source, name)).analyze()
            part.insert(0, "model", name)
            parts.append(part)
        frame = pd.concat(parts, ignore_index=True)
    elif side == "layer_spectra":
        frame = spectra.layer_spectra(source).to_frame()
    else:
        code = cli.main(["zoo", source, "--metrics", "alpha", "--quiet", "--no-report", "--out", out + ".zoo"])
        assert code == 0, code
        frame = pd.read_csv(os.path.join(out + ".zoo", "layers.csv"))
seconds, cpu = time.perf_counter() - imported, time.process_time() - cpu
frame.to_csv(out, index=False)
print(json.dumps({"seconds": seconds, "cpu_s": cpu, "imports_s": imported - start, "rows": len(frame), "base_mb": base,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "hwm_mb": status_mb("VmHWM")}))
"""


def run_side(side: str, source: str, out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p))
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", CHILD, side, source, out], env=env, capture_output=True, text=True,
                         timeout=TIMEOUT)
    wall = time.perf_counter() - start
    assert run.returncode == 0, f"{side}: {run.stderr[-3000:]}"
    report = json.loads(run.stdout.strip().splitlines()[-1])
    report["process_s"] = wall
    return report


def interleaved(benchmark, sides: dict, tmp_path, base: str = "weightwatcher") -> dict:
    """Each side (name -> source) in its own process, in turn, ROUNDS times; medians of the analysis seconds and
    the process seconds, the largest peak memory; ratios against `base` in extra_info; printed."""
    reports = {name: [] for name in sides}

    def one_round():
        k = len(reports[next(iter(sides))])
        for name, source in sides.items():
            reports[name].append(run_side(name, source, str(tmp_path / f"{name.replace(' ', '_')}{k}.csv")))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    summary = {}
    for name, runs in reports.items():
        summary[name] = {"seconds": statistics.median(r["seconds"] for r in runs),
                         "cpu_s": statistics.median(r["cpu_s"] for r in runs),
                         "process_s": statistics.median(r["process_s"] for r in runs),
                         "peak_mb": max(r["peak_mb"] for r in runs), "hwm_mb": max(r["hwm_mb"] for r in runs),
                         "base_mb": min(r["base_mb"] for r in runs),
                         "rows": runs[0]["rows"]}
    ww_version = __import__("weightwatcher").__version__
    benchmark.extra_info["weightwatcher_version"] = ww_version
    print(f"\n{benchmark.group} ({ROUNDS} interleaved round(s), one thread each, WeightWatcher {ww_version}):")
    for name, s in summary.items():
        speedup = summary[base]["seconds"] / s["seconds"]
        line = (f"  {name:<20} {s['seconds']:8.2f} s analysis (CPU {s['cpu_s']:7.2f} s, "
                f"process {s['process_s']:7.2f} s)  "
                f"peak {s['peak_mb']:7.0f} MB (VmHWM {s['hwm_mb']:7.0f} MB, after imports {s['base_mb']:5.0f} MB)  "
                f"{s['rows']:5d} rows")
        if name != base:
            line += (f"  {base}/this: {speedup:5.2f}x analysis, {summary[base]['cpu_s'] / s['cpu_s']:5.2f}x CPU, "
                     f"{summary[base]['process_s'] / s['process_s']:5.2f}x process")
        print(line)
        for key, value in s.items():
            benchmark.extra_info[f"{name}_{key}"] = value
        if name != base:
            benchmark.extra_info[f"speedup_{name}"] = speedup
    return summary


def assert_drop_in_agrees(expected: pd.DataFrame, got: pd.DataFrame):
    keys = ["model", "layer_id", "name"] if "model" in expected else ["layer_id", "name"]
    assert got[keys].astype(str).values.tolist() == expected[keys].astype(str).values.tolist()
    np.testing.assert_allclose(got["lambda_max"], expected["lambda_max"], rtol=1e-8)
    np.testing.assert_allclose(got["alpha"], expected["alpha"], rtol=1e-6)


def assert_lambda_max_agrees(expected: pd.DataFrame, ours: pd.DataFrame) -> int:
    """lambda_max of every layer WeightWatcher analysed, found in our table by (model,) layer name."""
    keys = ["model"] if "model" in expected else []
    theirs = expected.set_index(keys + ["name"])["lambda_max"]
    mine = ours.set_index(keys + ["layer"])["lambda_max"]
    mine.index.names = theirs.index.names
    both = theirs.index.intersection(mine.index)
    assert len(both) == len(theirs), theirs.index.difference(mine.index)[:5]
    np.testing.assert_allclose(mine.loc[both].to_numpy(float), theirs.loc[both].to_numpy(float), rtol=1e-8)
    return len(both)


def made(name: str) -> str:
    """benchmarks/make_folders.py's folder `name` under FOLDERS, written (once) by a child process: the
    parent stays small, since a child's ru_maxrss starts at its parent's resident memory when it is
    spawned (Linux keeps the high-water mark across exec)."""
    run = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "make_folders.py"), FOLDERS, "--only", name],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    return os.path.join(FOLDERS, name)


@pytest.mark.parametrize("model", ["qwen2_0.5b", "tinyllama_1.1b"])
def test_folder_against_weightwatcher(benchmark, model, tmp_path):
    folder = made(model)
    benchmark.group = f"WeightWatcher(model=folder).analyze() on a {model}-shaped folder (bf16)"
    summary = interleaved(benchmark, {"weightwatcher": folder, "drop-in": folder, "layer_spectra": folder}, tmp_path)
    expected = pd.read_csv(tmp_path / "weightwatcher0.csv")
    assert_drop_in_agrees(expected, pd.read_csv(tmp_path / "drop-in0.csv"))
    compared = assert_lambda_max_agrees(expected, pd.read_csv(tmp_path / "layer_spectra0.csv"))
    print(f"  agreement: drop-in rows = WeightWatcher's ({len(expected)}), alpha to 1e-6 and lambda_max to 1e-8; "
          f"layer_spectra's lambda_max on those {compared} layers to 1e-8")
    assert summary["drop-in"]["rows"] == summary["weightwatcher"]["rows"]


def test_zoo_of_16_checkpoints_against_a_weightwatcher_loop(benchmark, tmp_path):
    zoo = made("llama_zoo")
    benchmark.group = f"{make_folders.ZOO_SIZE} checkpoints of a small LLaMA (8 layers, 512/1376), alpha per layer"
    interleaved(benchmark, {"weightwatcher loop": zoo, "spectral-ext zoo": zoo, "drop-in loop": zoo}, tmp_path,
                base="weightwatcher loop")
    expected = pd.read_csv(tmp_path / "weightwatcher_loop0.csv")
    assert expected["model"].nunique() == make_folders.ZOO_SIZE
    assert_drop_in_agrees(expected, pd.read_csv(tmp_path / "drop-in_loop0.csv"))
    compared = assert_lambda_max_agrees(expected, pd.read_csv(tmp_path / "spectral-ext_zoo0.csv"))
    print(f"  agreement: drop-in rows = WeightWatcher's ({len(expected)}), alpha to 1e-6 and lambda_max to 1e-8; "
          f"the zoo's lambda_max on those {compared} layers to 1e-8")
