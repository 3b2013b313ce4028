"""Model zoos. In memory: 1000 digits CNNs (random weights), the per-model
rank metrics batched across the zoo against one model at a time. From disk
(section "Zoo runs from disk" of RESULTS.md): `spectral-ext zoo --metrics
alpha` over 1,000 checkpoints of ~5,000-parameter CNNs against a
WeightWatcher load + analyze + CSV loop (both as fresh processes, imports
included, interleaved); loading 10,000 safetensors checkpoints
(checkpoints/s) and analysing them (per-layer ESD, alpha, alpha-hat,
ranks); the same run under torchrun with 2 processes.

ZOO_BENCH_N (default 1000) and ZOO_BENCH_BIG (default 10000) size the zoos;
ZOO_BENCH_REPEATS (default 5) the interleaved repeats."""
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import datasets, zoo

from conftest import timed

N_MODELS = 1000
N_DISK = int(os.environ.get("ZOO_BENCH_N", "1000"))
N_BIG = int(os.environ.get("ZOO_BENCH_BIG", "10000"))
REPEATS = int(os.environ.get("ZOO_BENCH_REPEATS", "5"))
HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def small_cnn() -> nn.Sequential:
    """The Small CNN Zoo shape (Unterthiner et al. 2020): three 3x3
    convolutions of 16 channels (stride 2), global average pooling, a Linear
    to 10; 4,970 parameters."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def one_by_one(models):
    rows = []
    for name, model in models.items():
        for layer, module in model.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                W = module.weight.detach().double().reshape(module.weight.shape[0], -1)
                sigma = torch.linalg.svdvals(W)
                rank = se.rank.rank_of_singular_values(sigma)
                rows.append((name, layer, int(rank), float(sigma.square().sum() / sigma[0] ** 2), float(sigma[0])))
    return rows


@pytest.mark.parametrize("impl", ["native", "one_by_one"])
def test_zoo_1000_cnns_rank_metrics(benchmark, device, impl):
    torch.manual_seed(0)
    models = {f"m{i:04d}": datasets.digits_cnn().to(device) for i in range(N_MODELS)}
    x = torch.zeros(1, 1, 8, 8, device=device)
    fn = (lambda: zoo.model_metrics(models, ("rank",), x)) if impl == "native" else (lambda: one_by_one(models))
    benchmark.group = f"zoo of {N_MODELS} digits CNNs, rank metrics of 5 layers [{device}]"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(timed(fn, device), rounds=2, iterations=1, warmup_rounds=0)
    print(f"\n{impl}: {N_MODELS / benchmark.stats.stats.median:.0f} models/s")


# ------------------------------------------------------------------------------------- from disk


def write_zoo(folder: pathlib.Path, n: int) -> pathlib.Path:
    """n safetensors checkpoints of small_cnn with independent random weights
    (He-like scales, as at initialisation)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = {k: v.shape for k, v in small_cnn().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        state = {k: torch.randn(s, generator=g) / max(1, s[1:].numel()) ** 0.5 for k, s in shapes.items()}
        save_file(state, str(folder / f"m{i:05d}.safetensors"))
    return folder


@pytest.fixture(scope="module")
def disk_zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("disk_zoo"), N_DISK)


@pytest.fixture(scope="module")
def big_zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("big_zoo"), N_BIG)


WEIGHTWATCHER_LOOP = """
import pathlib, sys
import pandas as pd
import torch
import weightwatcher as ww
from safetensors.torch import load_file
from test_bench_zoo import small_cnn
torch.set_num_threads(1)
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.safetensors")):
    model = small_cnn()
    model.load_state_dict(load_file(str(path)))
    frame = ww.WeightWatcher(model=model).analyze()
    frame["model"] = path.stem
    rows.append(frame)
pd.concat(rows).to_csv(sys.argv[2], index=False)
"""


def _timed_process(argv, env) -> tuple[float, float]:
    """(wall, CPU user + system) seconds of a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert run.returncode == 0, run.stderr[-3000:]
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))


def test_zoo_from_disk_against_a_weightwatcher_loop(disk_zoo, tmp_path):
    pytest.importorskip("weightwatcher")
    env = _env()
    ours_cmd = [sys.executable, "-m", "spectral_ext", "zoo", str(disk_zoo), "--arch", "test_bench_zoo:small_cnn",
                "--metrics", "alpha", "--quiet"]
    times = {"spectral-ext zoo": [], "spectral-ext zoo --no-report": [], "weightwatcher loop": []}
    for k in range(REPEATS):  # interleaved A, B, C, A, B, C, ...
        times["spectral-ext zoo"].append(_timed_process(ours_cmd + ["--out", str(tmp_path / f"ours{k}")], env))
        times["spectral-ext zoo --no-report"].append(
            _timed_process(ours_cmd + ["--out", str(tmp_path / f"lean{k}"), "--no-report"], env))
        times["weightwatcher loop"].append(
            _timed_process([sys.executable, "-c", WEIGHTWATCHER_LOOP, str(disk_zoo), str(tmp_path / f"ww{k}.csv")],
                           env))
    ours = pd.read_csv(tmp_path / "ours0" / "layers.csv")
    theirs = pd.read_csv(tmp_path / "ww0.csv")
    assert ours["model"].nunique() == N_DISK == theirs["model"].nunique()
    assert len(ours) == len(theirs) == 4 * N_DISK  # every layer of every member, both sides
    _print_medians(times, f"{N_DISK} checkpoints")


def _print_medians(times, what):
    """Medians of interleaved (wall, CPU) repeats, each against the WeightWatcher loop."""
    medians = {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
               for name, t in times.items()}
    ww_wall, ww_cpu = medians["weightwatcher loop"]
    print(f"\n{what}, {REPEATS} interleaved repeats, medians (wall / CPU):")
    for name, (wall, cpu) in medians.items():
        print(f"  {name:<32} {wall:7.2f} s / {cpu:7.2f} s   weightwatcher / this: {ww_wall / wall:5.1f}x wall, "
              f"{ww_cpu / cpu:5.1f}x CPU")


def _weightwatcher_loop(folder):
    import weightwatcher as ww
    from safetensors.torch import load_file

    rows = []
    for path in sorted(pathlib.Path(folder).glob("*.safetensors")):
        model = small_cnn()
        model.load_state_dict(load_file(str(path)))
        frame = ww.WeightWatcher(model=model).analyze()
        frame["model"] = path.stem
        rows.append(frame)
    return pd.concat(rows)


def test_zoo_from_disk_in_process_against_a_weightwatcher_loop(disk_zoo, tmp_path):
    """The same two jobs without the interpreter and imports both pay:
    zoo.analyze (one trace, reading, checks, metrics, tables; report or not)
    against the WeightWatcher loop, CPU and wall, interleaved."""
    pytest.importorskip("weightwatcher")
    torch.set_num_threads(1)
    jobs = {"zoo.analyze": lambda k: zoo.analyze(disk_zoo, arch=small_cnn, out=tmp_path / f"a{k}", metrics=("alpha",),
                                                 progress=False),
            "zoo.analyze, report=False": lambda k: zoo.analyze(disk_zoo, arch=small_cnn, out=tmp_path / f"b{k}",
                                                               metrics=("alpha",), progress=False, report=False),
            "weightwatcher loop": lambda k: _weightwatcher_loop(disk_zoo)}
    for job in jobs.values():  # warm: imports, matplotlib's font cache
        job("warm")
    times = {name: [] for name in jobs}
    for k in range(REPEATS):
        for name, job in jobs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            job(k)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    _print_medians(times, f"{N_DISK} checkpoints in one process")


def test_loading_and_analysing_10000_checkpoints(big_zoo):
    """Loading: read (a thread pool, memory-mapped when large), check every
    floating tensor and bind to the one trace, as a zoo run does; then the
    per-layer ESD + alpha + alpha-hat + ranks of all of them."""
    torch.set_num_threads(1)
    members = zoo.list_members(big_zoo)
    load, analyse = [], []
    for _ in range(REPEATS):
        run = zoo.members._Members(members, small_cnn, False, None)
        run.bind(*run.read(["m00000"]).result()[0])  # the one trace of the run, not loading
        start, cpu = time.perf_counter(), time.process_time()
        graphs = {}
        for i in range(0, len(members), 256):
            loaded = run.read([n for n, _ in members[i:i + 256]]).result()
            with zoo.members._collector_paused():
                graphs.update({n: run.bind(n, s)[0] for n, s in loaded})
        load.append((time.perf_counter() - start, time.process_time() - cpu))
        run.close()
        start, cpu = time.perf_counter(), time.process_time()
        tables = zoo.model_metrics(None, ("rank", "alpha"), graphs=graphs)
        analyse.append((time.perf_counter() - start, time.process_time() - cpu))
        assert len(tables["layers"]) == 4 * N_BIG and tables["models"]["alpha_hat"].notna().all()
    (load_wall, load_cpu), (analyse_wall, analyse_cpu) = [
        (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for t in (load, analyse)]
    print(f"\n{N_BIG} checkpoints, median of {REPEATS} (wall / CPU): loading {load_wall:.2f} s / {load_cpu:.2f} s "
          f"({N_BIG / load_wall:.0f} / {N_BIG / load_cpu:.0f} checkpoints/s), analysis {analyse_wall:.2f} s / "
          f"{analyse_cpu:.2f} s")


def test_torchrun_two_processes_against_one(big_zoo, tmp_path):
    env = _env()
    command = ["-m", "spectral_ext", "zoo", str(big_zoo), "--arch", "test_bench_zoo:small_cnn", "--metrics",
               "rank,alpha", "--quiet", "--no-report"]
    one, two = [], []
    for k in range(min(REPEATS, 3)):
        one.append(_timed_process([sys.executable] + command + ["--out", str(tmp_path / f"one{k}")], env)[0])
        two.append(_timed_process([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc_per_node=2"] + command + ["--out", str(tmp_path / f"two{k}")], env)[0])
    a = pd.read_csv(tmp_path / "one0" / "layers.csv").sort_values(["model", "layer"]).reset_index(drop=True)
    b = pd.read_csv(tmp_path / "two0" / "layers.csv").sort_values(["model", "layer"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    print(f"\n{N_BIG} checkpoints end to end: one process {statistics.median(one):.2f} s, torchrun x2 "
          f"{statistics.median(two):.2f} s")
