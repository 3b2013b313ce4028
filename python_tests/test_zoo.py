"""Model zoos: batched metrics equal per-model ones, bad members become error
rows, interrupted runs resume without loss or duplication, torchrun shards
merge to the single-process result, and the command line."""
import math
import os
import pathlib
import subprocess
import time
import sys

import pandas as pd
import pytest
import torch

import spectral_ext as se
from spectral_ext import datasets, spectra, zoo
from spectral_ext.cli import main

ARCH = "spectral_ext.datasets:digits_cnn"
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    """40 digits CNNs trained briefly with different seeds, half as .pt and half
    as .safetensors, plus a corrupt, a truncated, a mismatched and a NaN one."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("zoo")
    x_train, y_train, _, _ = datasets.digits()
    for i in range(40):
        torch.manual_seed(i)
        model = datasets.train(datasets.digits_cnn(), x_train[:300], y_train[:300], epochs=1, generator=i)
        if i % 2:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / f"cnn_{i:02d}.safetensors"))
        else:
            torch.save(model.state_dict(), root / f"cnn_{i:02d}.pt")
    (root / "corrupt.pt").write_bytes(b"definitely not a checkpoint")
    data = (root / "cnn_01.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    torch.save(datasets.digits_mlp().state_dict(), root / "mismatch.pt")
    state = datasets.digits_cnn().state_dict()
    state["2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, root / "nan_weights.pt")
    return root


def probe():
    return datasets.digits()[2][:96]


def sort(frame, keys):
    return frame.sort_values(keys).reset_index(drop=True)


def test_batched_zoo_equals_per_model_results(zoo_dir):
    tables = zoo.analyze(zoo_dir, arch=ARCH, metrics=("rank", "alpha", "svr"), pairs=("cka", "procrustes:group=grelu"),
                         probe=probe(), max_pairs=5, progress=False)
    models = tables["models"].set_index("model")
    assert len(models) == 44
    errors = models["error"].fillna("")
    assert "unreadable checkpoint" in errors["corrupt"] and "unreadable checkpoint" in errors["truncated"]
    assert "does not match the architecture" in errors["mismatch"]
    assert "NaN or infinite values in 2.weight" in errors["nan_weights"]
    assert (errors[[f"cnn_{i:02d}" for i in range(40)]] == "").all()
    layers = tables["layers"]
    for name in ("cnn_00", "cnn_17", "cnn_39"):
        suffix = ".safetensors" if int(name[-2:]) % 2 else ".pt"
        model = zoo.load_member(zoo_dir / f"{name}{suffix}", datasets.digits_cnn)
        rows = layers[layers["model"] == name].set_index("layer")
        alpha_hat = 0.0
        for layer in ("0", "2", "5", "8", "10"):
            W = model.get_submodule(layer).weight.detach().double().reshape(model.get_submodule(layer).weight.shape[0], -1)
            assert rows.loc[layer, "numerical_rank"] == int(se.numerical_rank(W))
            assert rows.loc[layer, "stable_rank"] == pytest.approx(float(se.stable_rank(W)))
            fit = spectra.fit_power_law(torch.linalg.svdvals(W).square())
            if math.isnan(fit.alpha):
                assert math.isnan(rows.loc[layer, "alpha"])
            else:
                assert rows.loc[layer, "alpha"] == pytest.approx(fit.alpha)
                alpha_hat += fit.alpha * math.log(rows.loc[layer, "lambda_max"])
        assert models.loc[name, "alpha_hat"] == pytest.approx(alpha_hat)
        single = se.svr(model, dtype=torch.float64)
        edges = tables["edges"][tables["edges"]["model"] == name]
        assert [tuple(r) for r in edges[["d_out", "d_in"]].to_numpy()] == \
            [single.internal_dimensions(k) for k in range(len(single.edges))]
    pairs = tables["pairs"]
    pairs = pairs[pairs["measure"] == "cka"]
    assert len(tables["pairs"]) == 5 * 5 * 2 and not pairs["model_a"].isin(["corrupt", "mismatch"]).any()
    a, b = pairs.iloc[0][["model_a", "model_b"]]
    ma = zoo.load_member(zoo_dir / f"{a}{'.safetensors' if int(a[-2:]) % 2 else '.pt'}", datasets.digits_cnn)
    mb = zoo.load_member(zoo_dir / f"{b}{'.safetensors' if int(b[-2:]) % 2 else '.pt'}", datasets.digits_cnn)
    layer = pairs.iloc[0]["layer"]
    with torch.no_grad():
        expected = se.cka(zoo.metrics._activations(ma, probe(), [layer])[layer], zoo.metrics._activations(mb, probe(), [layer])[layer])
    assert pairs.iloc[0]["value"] == pytest.approx(expected)


def test_each_model_runs_on_the_probe_once(zoo_dir, monkeypatch):
    runs = []
    original = zoo.metrics._activations
    monkeypatch.setattr(zoo.metrics, "_activations", lambda model, x, layers: runs.append(1) or original(model, x, layers))
    tables = zoo.analyze(zoo_dir, arch=ARCH, metrics=("rank",), pairs=("cka",), probe=probe(), max_pairs=12,
                         chunk_size=2, progress=False)
    pairs = tables["pairs"][["model_a", "model_b"]].drop_duplicates()
    assert len(pairs) == 12
    assert len(runs) == len(set(pairs["model_a"]) | set(pairs["model_b"]))  # not once per pair chunk


def test_stitching_penalties_between_zoo_members(zoo_dir):
    _, _, x_test, y_test = datasets.digits()
    probe = (x_test[:200], y_test[:200])
    models = {n: zoo.load_member(zoo_dir / f"{n}.pt", datasets.digits_cnn) for n in ("cnn_00", "cnn_02")}
    frame = zoo.pair_metrics(models, [("cnn_00", "cnn_02")], probe, ["3"], ("stitching",),
                             {"epochs": 2, "generator": 1})
    result = se.stitch(models["cnn_00"], models["cnn_02"], "3", data=(probe[0][:100], probe[1][:100]),
                       test_data=(probe[0][100:], probe[1][100:]), kind="affine", epochs=2, lr=0.01, generator=1,
                       progress=False)
    assert frame["value"].iloc[0] == pytest.approx(result.penalty)
    with pytest.raises(zoo.ZooError, match="labelled probe"):
        zoo.pair_metrics(models, [("cnn_00", "cnn_02")], probe[0], ["3"], ("stitching",))


def test_interrupted_run_resumes_without_loss_or_duplicates(zoo_dir, tmp_path, monkeypatch):
    full = zoo.analyze(zoo_dir, arch=ARCH, metrics=("rank",), progress=False)
    calls = {"n": 0}
    original = zoo.analysis._process_chunk

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed mid-run
        return original(*args, **kwargs)

    monkeypatch.setattr(zoo.analysis, "_process_chunk", dies_on_third)
    out = tmp_path / "results"
    with pytest.raises(KeyboardInterrupt):
        zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), chunk_size=8, progress=False)
    finished = [p for p in (out / "chunks").iterdir() if not p.name.startswith(".")]
    assert len(finished) == 2
    (out / "chunks" / ".half-written.tmp").mkdir()  # a chunk caught mid-write is ignored
    monkeypatch.setattr(zoo.analysis, "_process_chunk", original)
    seen = []
    monkeypatch.setattr(zoo.analysis, "_process_chunk", lambda chunk, *a, **k: seen.extend(n for n, _ in chunk) or original(chunk, *a, **k))
    resumed = zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), chunk_size=8, progress=False)
    assert len(seen) == 44 - 16  # finished models are not recomputed
    assert resumed["models"]["model"].is_unique and len(resumed["models"]) == 44
    pd.testing.assert_frame_equal(sort(resumed["layers"], ["model", "layer"]), sort(full["layers"], ["model", "layer"]),
                                  check_dtype=False)
    assert (out / "report.md").exists() and (out / "numerical_rank.png").exists()


def test_parquet_output_and_report_with_accuracies(zoo_dir, tmp_path):
    metadata = tmp_path / "accuracies.csv"
    pd.DataFrame({"model": [f"cnn_{i:02d}" for i in range(40)], "accuracy": [0.5 + i / 100 for i in range(40)]}) \
        .to_csv(metadata, index=False)
    out = tmp_path / "results"
    tables = zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank", "alpha"), fmt="parquet", metadata=metadata,
                         progress=False)
    assert (out / "layers.parquet").exists()
    assert len(pd.read_parquet(out / "layers.parquet")) == len(tables["layers"]) == 40 * 5
    report = (out / "report.md").read_text()
    assert "- errors: 4" in report and "nan_weights" in report
    assert (out / "alpha_hat_vs_accuracy.png").exists() and (out / "mean_numerical_rank_vs_accuracy.png").exists()


def test_torchrun_two_processes_equal_one(zoo_dir, tmp_path):
    single = tmp_path / "single"
    assert main(["zoo", str(zoo_dir), "--arch", ARCH, "--metrics", "rank,alpha", "--pairs", "cka",
                 "--probe", "digits:64", "--max-pairs", "6", "--out", str(single), "--quiet"]) == 0
    double = tmp_path / "double"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "spectral_ext", "zoo", str(zoo_dir), "--arch", ARCH, "--metrics", "rank,alpha",
                          "--pairs", "cka", "--probe", "digits:64", "--max-pairs", "6", "--out", str(double),
                          "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = {p.name.split("-")[1] for p in (double / "chunks").iterdir()}
    assert ranks == {"0", "1"}  # both processes wrote their shards
    for table, keys in (("models", ["model"]), ("layers", ["model", "layer"]),
                        ("pairs", ["model_a", "model_b", "layer", "measure"])):
        a = sort(pd.read_csv(single / f"{table}.csv"), keys)
        b = sort(pd.read_csv(double / f"{table}.csv"), keys)
        pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_command_line_errors_and_svr(zoo_dir, tmp_path, capsys):
    assert main(["zoo", str(tmp_path / "missing"), "--arch", ARCH, "--out", str(tmp_path / "o")]) == 3
    assert "no such checkpoint folder" in capsys.readouterr().err
    assert main(["zoo", str(zoo_dir), "--arch", "no.such.module:factory", "--out", str(tmp_path / "o")]) == 3
    assert "unknown architecture" in capsys.readouterr().err
    assert main(["zoo", str(zoo_dir), "--arch", "not_a_torchvision_model", "--out", str(tmp_path / "o")]) == 3
    with pytest.raises(SystemExit) as exit_info:
        main(["zoo", str(zoo_dir)])  # --out is required: argparse exits with 2
    assert exit_info.value.code == 2
    figure = tmp_path / "svr.png"
    assert main(["svr", str(zoo_dir / "cnn_00.pt"), "--arch", ARCH, "--plot", str(figure)]) == 0
    assert "previous" in capsys.readouterr().out and figure.exists()
    assert main(["svr", str(zoo_dir / "corrupt.pt"), "--arch", ARCH]) == 3


# --------------------------------------------------------------------------- issue 14 items 7-12


def bn_cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10))


def _save(state, path):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.fixture(scope="module")
def bn_zoo(tmp_path_factory):
    """Six BatchNorm CNNs with trained-looking statistics; one with a NaN in
    running_var, one with an infinite running_mean."""
    root = tmp_path_factory.mktemp("bn_zoo")
    x = datasets.digits()[0][:128]
    for i in range(6):
        torch.manual_seed(i)
        model = bn_cnn().train()
        with torch.no_grad():
            model(x)  # BatchNorm statistics move away from their initial values
        state = model.state_dict()
        if i == 4:
            state["1.running_var"][3] = float("nan")
        if i == 5:
            state["1.running_mean"][0] = float("inf")
        _save(state, root / f"bn_{i}.safetensors")
    return root


def test_every_floating_tensor_is_checked_and_a_bad_member_is_an_error_row(bn_zoo, tmp_path):
    out = tmp_path / "results"
    tables = zoo.analyze(bn_zoo, arch=bn_cnn, out=out, metrics=("rank", "alpha"), pairs=("cka",), probe=probe(),
                         progress=False)
    errors = tables["models"].set_index("model")["error"]
    assert "NaN or infinite values in 1.running_var" in errors["bn_4"]
    assert "NaN or infinite values in 1.running_mean" in errors["bn_5"]
    assert (errors[[f"bn_{i}" for i in range(4)]] == "").all()
    pairs = tables["pairs"][["model_a", "model_b"]].drop_duplicates()
    assert len(pairs) == 6 and not pairs.isin(["bn_4", "bn_5"]).any().any()  # C(4, 2) pairs of good members
    assert set(tables["layers"]["model"]) == {f"bn_{i}" for i in range(4)}
    # the same run resumed: nothing recomputed, nothing lost
    again = zoo.analyze(bn_zoo, arch=bn_cnn, out=out, metrics=("rank", "alpha"), pairs=("cka",), probe=probe(),
                        progress=False)
    pd.testing.assert_frame_equal(again["pairs"], tables["pairs"])


def test_a_member_whose_analysis_fails_is_an_error_row(zoo_dir, monkeypatch):
    original = zoo.model_metrics

    def fails_on_cnn_03(models, metrics, example_input=None, dtype=torch.float64, graphs=None):
        if "cnn_03" in graphs:
            raise RuntimeError("linalg.eigh: the algorithm failed to converge")
        return original(models, metrics, example_input, dtype, graphs=graphs)

    monkeypatch.setattr(zoo.analysis, "model_metrics", fails_on_cnn_03)
    tables = zoo.analyze(zoo_dir, arch=ARCH, metrics=("rank",), chunk_size=8, progress=False)
    errors = tables["models"].set_index("model")["error"].fillna("")
    assert "analysis failed (RuntimeError: linalg.eigh" in errors["cnn_03"]
    assert (errors[[f"cnn_{i:02d}" for i in range(40) if i != 3]] == "").all()
    assert set(tables["layers"]["model"]) == {f"cnn_{i:02d}" for i in range(40) if i != 3}


MISSING_LOOKING = ["NA", "NaN", "nan", "null", "NULL", "None", "N/A", "#N/A", "", "-nan", "1.0", "0", "<NA>"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_member_names_are_strings_never_missing_values(fmt, tmp_path, monkeypatch):
    torch.manual_seed(0)
    members = {name: datasets.digits_mlp(width=8) for name in MISSING_LOOKING}
    out = tmp_path / "results"
    original = zoo.analysis._process_chunk
    calls = {"n": 0}

    def dies_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(zoo.analysis, "_process_chunk", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        zoo.analyze(members, out=out, metrics=("rank",), pairs=("cka",), probe=probe().reshape(-1, 64), fmt=fmt,
                    chunk_size=4, progress=False)
    seen = []
    monkeypatch.setattr(zoo.analysis, "_process_chunk", lambda chunk, *a, **k: seen.extend(n for n, _ in chunk)
                        or original(chunk, *a, **k))
    tables = zoo.analyze(members, out=out, metrics=("rank",), pairs=("cka",), probe=probe().reshape(-1, 64),
                         fmt=fmt, chunk_size=4, progress=False)
    assert len(seen) == len(MISSING_LOOKING) - 4  # the first chunk counted as done, whatever its names
    models = tables["models"]
    assert sorted(models["model"]) == sorted(MISSING_LOOKING) and models["model"].map(type).eq(str).all()
    assert (models["error"] == "").all() and models["model"].is_unique
    assert sorted(set(tables["layers"]["model"])) == sorted(MISSING_LOOKING)
    n = len(MISSING_LOOKING)
    pairs = tables["pairs"][["model_a", "model_b"]].drop_duplicates()
    assert len(pairs) == n * (n - 1) // 2 and len(tables["pairs"]) == n * (n - 1) // 2 * 4  # 4 Linear maps
    assert set(pairs["model_a"]) | set(pairs["model_b"]) == set(MISSING_LOOKING)


def test_members_are_named_by_relative_path(tmp_path):
    torch.manual_seed(0)
    state = datasets.digits_mlp(width=8).state_dict()
    for rel in ("a.pt", "a.safetensors", "b.pt", "seed_1/epoch_2.safetensors", "seed_2/epoch_2.safetensors",
                ".hidden/c.pt"):
        _save(state, tmp_path / "zoo" / rel)
    members = zoo.list_members(tmp_path / "zoo")
    assert [n for n, _ in members] == ["a.pt", "a.safetensors", "b", "seed_1/epoch_2", "seed_2/epoch_2"]
    assert [p.relative_to(tmp_path / "zoo").as_posix() for _, p in members] == \
        ["a.pt", "a.safetensors", "b.pt", "seed_1/epoch_2.safetensors", "seed_2/epoch_2.safetensors"]
    tables = zoo.analyze(tmp_path / "zoo", arch=lambda: datasets.digits_mlp(width=8), out=tmp_path / "results",
                         metrics=("rank",), progress=False)
    models = tables["models"].set_index("model")
    assert len(models) == 5 and (models["error"] == "").all()
    assert models.loc["a.safetensors", "path"].endswith("a.safetensors")  # the models table says which file


def test_resuming_with_other_options_is_refused_or_completed(zoo_dir, tmp_path, capsys):
    out = tmp_path / "results"
    zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), progress=False)
    with pytest.raises(zoo.ZooError, match="other models options.*metrics"):
        zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank", "alpha"), progress=False)
    assert main(["zoo", str(zoo_dir), "--arch", ARCH, "--metrics", "rank,alpha", "--out", str(out), "--quiet"]) == 3
    assert "other models options" in capsys.readouterr().err
    # a run without pair measures resumed with some: the pairs are computed, the models kept
    tables = zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), pairs=("cka",), probe=probe(),
                         max_pairs=4, progress=False)
    assert len(tables["pairs"][["model_a", "model_b"]].drop_duplicates()) == 4
    with pytest.raises(zoo.ZooError, match="other pairs options.*max_pairs"):
        zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), pairs=("cka",), probe=probe(), max_pairs=8,
                    progress=False)
    with pytest.raises(zoo.ZooError, match="other pairs options.*probe"):
        zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), pairs=("cka",), probe=probe()[:50],
                    max_pairs=4, progress=False)
    assert "\"max_pairs\": 4" in (out / "options.json").read_text()


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(zoo_dir, tmp_path):
    import fcntl
    import json
    import socket

    out = tmp_path / "results"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    with open(out / ".lock") as held:  # a live writer holds the flock (another open file: a lock of its own)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(zoo.ZooError, match=f"in use by another run \\(pid {os.getpid()} on {socket.gethostname()}"):
            zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), progress=False)
    assert not (out / "chunks").exists() and (out / ".lock").exists()  # nothing written, the holder's lock kept
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    (out / ".lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "since": "then"}))
    tables = zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), progress=False)
    assert len(tables["models"]) == 44 and not (out / ".lock").exists()  # taken over, then released


def test_a_real_concurrent_writer_is_refused(zoo_dir, tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    slow = ("import time, sys; from spectral_ext import zoo; original = zoo.analysis._process_chunk\n"
            "zoo.analysis._process_chunk = lambda *a, **k: (time.sleep(60), original(*a, **k))[1]\n"
            f"zoo.analyze({str(zoo_dir)!r}, arch={ARCH!r}, out={str(out)!r}, metrics=('rank',), progress=False)")
    first = subprocess.Popen([sys.executable, "-c", slow], env=env)
    try:
        for _ in range(600):
            if (out / ".lock").exists() and (out / ".lock").read_text():
                break
            time.sleep(0.1)
        with pytest.raises(zoo.ZooError, match=f"pid {first.pid}"):
            zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), progress=False)
    finally:
        first.kill()
        first.wait(timeout=300)


def _unwritable(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return str(folder / "results")
    return "/sys/spectral-ext-results"  # root may write anywhere but in sysfs


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "corrupt_probe.pt").write_bytes(b"not a tensor file")
    torch.save({"not": "a tensor"}, tmp_path / "dict_probe.pt")
    return tmp_path


BAD_ARGUMENTS = [  # (extra arguments, exit code, what the one-line reason says)
    (["--out", ""], 3, "out must name a results folder"),
    (["--out", "{tmp}/a_file"], 3, "exists and is not a folder"),
    (["--out", "/dev/null"], 3, "exists and is not a folder"),
    (["--out", "{tmp}/a_file/sub"], 3, "not a writable folder"),
    (["--out", "{unwritable}"], 3, "not a writable folder"),
    (["--layers", "nope", "--pairs", "cka", "--probe", "digits:16"], 3, "layers names no submodule"),
    (["--layers", "3", "--probe", "digits:16"], 3, "apply to pair measures"),
    (["--layers", ""], 2, "--layers must be a comma-separated list"),
    (["--chunk-size", "0"], 2, "--chunk-size: must be an integer >= 1"),
    (["--chunk-size", "x"], 2, "--chunk-size: must be an integer >= 1"),
    (["--max-pairs", "-1"], 2, "--max-pairs: must be an integer >= 1"),
    (["--probe", "digits:3", "--pairs", "cka"], 3, "digits:N needs N from 4"),
    (["--probe", "digits:x", "--pairs", "cka"], 3, "digits:N needs N from 4"),
    (["--probe", "{tmp}/corrupt_probe.pt", "--pairs", "cka"], 3, "unreadable probe file"),
    (["--probe", "{tmp}/dict_probe.pt", "--pairs", "cka"], 3, "must hold a floating tensor"),
    (["--probe", "{tmp}/missing.pt", "--pairs", "cka"], 3, "no such probe file"),
    (["--pairs", "cka"], 3, "--pairs needs --probe"),
    (["--pairs", "stitching", "--probe", "{tmp}/probe.pt"], 3, "needs a labelled probe"),
    (["--metadata", "{tmp}/missing.csv"], 3, "no such metadata file"),
    (["--metadata", "{tmp}/corrupt_probe.pt"], 3, "needs a 'model' column"),
    (["--metrics", ""], 2, "--metrics must be a comma-separated list"),
    (["--metrics", "nope"], 3, "unknown metrics ['nope']"),
    (["--arch", "no.such.module:factory"], 3, "unknown architecture"),
]


@pytest.mark.parametrize("extra, code, reason", BAD_ARGUMENTS, ids=[" ".join(a[0]) or "empty" for a in BAD_ARGUMENTS])
def test_every_argument_is_checked_before_any_work(zoo_dir, bad_files, extra, code, reason, capsys, monkeypatch):
    torch.save(torch.zeros(8, 1, 8, 8), bad_files / "probe.pt")
    cwd = bad_files / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for name in ("_process_chunk", "_process_pairs", "_commit_chunk"):
        monkeypatch.setattr(zoo.analysis, name, lambda *a, **k: pytest.fail("work started before the arguments were checked"))
    extra = [a.format(tmp=bad_files, unwritable=_unwritable(bad_files)) for a in extra]
    argv = ["zoo", str(zoo_dir), "--arch", ARCH, "--quiet"] + extra
    if "--out" not in extra:
        argv += ["--out", str(bad_files / "results")]
    try:
        result = main(argv)
    except SystemExit as exit_info:  # argparse's own exit
        result = exit_info.code
    err = capsys.readouterr().err
    assert result == code, err
    assert "Traceback" not in err and reason in err.strip().splitlines()[-1]
    if code == 3:
        assert len(err.strip().splitlines()) == 1
    assert list(cwd.iterdir()) == []  # nothing written into the current folder
    assert not (bad_files / "results" / "chunks").exists()


def test_one_trace_per_architecture_for_the_whole_run(zoo_dir, monkeypatch):
    from spectral_ext import layers

    traces = []
    original = layers.discover
    monkeypatch.setattr(zoo.members, "discover", lambda *a, **k: traces.append(1) or original(*a, **k))
    runs = []
    forward = torch.nn.Sequential.forward
    monkeypatch.setattr(torch.nn.Sequential, "forward", lambda self, x: runs.append(1) or forward(self, x))
    tables = zoo.analyze(zoo_dir, arch=ARCH, metrics=("rank", "alpha"), chunk_size=4, progress=False)
    assert len(tables["models"]) == 44 and len(traces) == 1  # 11 chunks, one trace
    assert len(runs) <= 3  # the input-size guesses of that one trace, never per chunk


def test_checkpoint_reading_and_instantiation_match_torch(bn_zoo, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = bn_cnn().train()
    with torch.no_grad():
        model(datasets.digits()[0][:64])
    state = model.state_dict()
    _save(state, tmp_path / "m.safetensors")
    _save(state, tmp_path / "m.pt")
    for big in (False, True):  # read whole, and memory-mapped as large files are
        monkeypatch.setattr(zoo.members, "_MMAP_BYTES", 0 if big else 1 << 30)
        for path in (tmp_path / "m.safetensors", tmp_path / "m.pt"):
            read = zoo.read_checkpoint(path)
            assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    template = bn_cnn().eval()
    copy = zoo.members._instantiate(template, state)
    reference = zoo.load_member(tmp_path / "m.pt", bn_cnn)
    x = datasets.digits()[2][:16]
    with torch.no_grad():
        assert torch.equal(copy(x), reference(x))
    before = {k: v.clone() for k, v in template.state_dict().items()}
    handle = copy[0].register_forward_hook(lambda *a: None)
    copy.train()
    with torch.no_grad():
        copy(x)  # updates the copy's BatchNorm statistics, not the template's
    handle.remove()
    assert not template[0]._forward_hooks and not template.training
    assert all(torch.equal(before[k], v) for k, v in template.state_dict().items())


def test_pair_measures_give_the_models_back_as_they_came(tmp_path):
    torch.manual_seed(0)
    models = {n: bn_cnn().train() for n in ("a", "b")}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    first = zoo.pair_metrics(models, [("a", "b")], probe(), ["1", "4"], ("cka",))
    second = zoo.pair_metrics(models, [("a", "b")], probe(), ["1", "4"], ("cka",))
    pd.testing.assert_frame_equal(first, second)  # eval mode: running statistics neither used batch-wise nor moved
    for n, m in models.items():
        assert m.training and all(torch.equal(before[n][k], v) for k, v in m.state_dict().items())


def test_progress_bars_move_in_both_phases(zoo_dir, capsys):
    zoo.analyze(zoo_dir, arch=ARCH, metrics=("rank",), pairs=("cka",), probe=probe(), max_pairs=5, chunk_size=8)
    err = capsys.readouterr().err
    assert "44/44" in err and "5/5" in err and "models (rank 0)" in err and "pairs (rank 0)" in err


class Untraceable(torch.nn.Module):
    """A conv whose forward fails on every input (a stand-in for an architecture the trace cannot run)."""

    calls = 0

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)

    def forward(self, x):
        Untraceable.calls += 1
        raise RuntimeError("unsupported input")


def test_an_untraceable_architecture_is_an_error_row_per_member_traced_once(tmp_path):
    for i in range(5):
        torch.manual_seed(i)
        _save(Untraceable().state_dict(), tmp_path / "zoo" / f"u{i}.safetensors")
    Untraceable.calls = 0
    tables = zoo.analyze(tmp_path / "zoo", arch=Untraceable, metrics=("rank",), chunk_size=2, progress=False)
    errors = tables["models"].set_index("model")["error"]
    assert len(errors) == 5 and errors.str.contains("could not be traced").all()
    assert Untraceable.calls <= 6  # one trace (fx, then the input-size guesses), not one per member


def test_pair_measures_only_from_the_command_line(zoo_dir, tmp_path):
    out = tmp_path / "results"
    assert main(["zoo", str(zoo_dir), "--arch", ARCH, "--metrics", "none", "--pairs", "cka", "--probe", "digits:16",
                 "--max-pairs", "3", "--out", str(out), "--quiet", "--no-report"]) == 0
    models = pd.read_csv(out / "models.csv", keep_default_na=False)
    assert len(models) == 44 and (models["error"] != "").sum() == 4  # the load checks still run
    assert len(pd.read_csv(out / "pairs.csv")[["model_a", "model_b"]].drop_duplicates()) == 3
    assert not (out / "report.md").exists() and (out / "layers.csv").read_text().strip() == ""


def _grouped_cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1, groups=2), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10))


@pytest.mark.parametrize("convention", spectra.CONVENTIONS)
@pytest.mark.parametrize("make", [datasets.digits_cnn, datasets.digits_mlp, _grouped_cnn],
                         ids=["cnn", "mlp", "grouped"])
def test_layer_spectra_and_model_metrics_give_identical_numbers(make, convention):
    x = torch.zeros(1, 1, 8, 8)
    models = {}
    for i in range(3):
        torch.manual_seed(i)
        models[f"m{i}"] = make()
    tables = zoo.model_metrics(models, ("rank", "alpha"), x, convention=convention, min_tail=4)
    columns = ["numerical_rank", "stable_rank", "spectral_norm", "lambda_max", "alpha", "xmin", "ks", "n_tail", "note"]
    for name, model in models.items():
        ours = tables.layers[tables.layers["model"] == name].reset_index(drop=True)
        alone = spectra.layer_spectra(model, x, min_tail=4, convention=convention).to_frame()
        assert ours["layer"].tolist() == alone["layer"].tolist()
        # the same numbers to float64 rounding: a BLAS may round a batched Gram by its position in the batch
        pd.testing.assert_frame_equal(ours[columns], alone[columns], check_exact=False, rtol=1e-13, atol=0)
        alpha_hat = tables.models.set_index("model").loc[name, "alpha_hat"]
        assert alpha_hat == pytest.approx(spectra.alpha_hat(alone), rel=1e-13)
        assert tables.models.set_index("model").loc[name, "n_alpha_layers"] == alone["alpha"].notna().sum()


def test_zoo_tables_are_a_dataclass_a_frame_a_figure_and_a_mapping(zoo_dir):
    tables = zoo.analyze(zoo_dir, arch=ARCH, metrics=("rank",), progress=False, report=False)
    assert isinstance(tables, zoo.ZooTables) and list(tables) == list(zoo.TABLES)
    assert tables["layers"] is tables.layers and tables.to_frame() is tables.layers
    assert tables.to_frame("models") is tables.models and tables.get("nope") is None
    with pytest.raises(ValueError, match="table must be one of"):
        tables.to_frame("nope")
    fig = tables.plot("numerical_rank")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "numerical_rank" and "40 checkpoints" in ax.get_title()
    drawn = [sum(p.get_height() for p in c.patches) for c in ax.containers]
    assert drawn == [40] * 5  # one histogram per layer, every member counted once
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"layer {n}" for n in ("0", "2", "5", "8", "10")]
    with pytest.raises(ValueError, match="column must be a column of the layers table"):
        tables.plot("nope")


def test_pairs_are_sampled_with_a_generator_and_seed_is_refused(zoo_dir, tmp_path):
    def sampled(**options):
        tables = zoo.analyze(zoo_dir, arch=ARCH, metrics=("rank",), pairs=("cka",), probe=probe(), max_pairs=3,
                             layers=["10"], progress=False, report=False, **options)
        return sorted(set(zip(tables.pairs["model_a"], tables.pairs["model_b"])))

    first = sampled(generator=3)
    assert len(first) == 3 and sampled(generator=3) == first
    with pytest.raises(TypeError, match="unexpected keyword argument 'seed'"):  # its name before issue 17
        sampled(seed=3)
    assert sampled(generator=torch.Generator().manual_seed(5)) == sampled(generator=torch.Generator().manual_seed(5))
    with pytest.raises(zoo.ZooError, match="generator must be a torch.Generator, an int seed or None"):
        sampled(generator="x")
    out = tmp_path / "run"  # None draws a seed; a resumed run takes the recorded one
    tables = zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), pairs=("cka",), probe=probe(), max_pairs=3,
                         layers=["10"], progress=False, report=False)
    recorded = __import__("json").loads((out / "options.json").read_text())["pairs"]["seed"]
    assert isinstance(recorded, int)
    again = zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), pairs=("cka",), probe=probe(), max_pairs=3,
                        layers=["10"], progress=False, report=False)
    pd.testing.assert_frame_equal(again.pairs, tables.pairs)


def test_small_safetensors_are_read_as_safetensors_reads_them(tmp_path):
    from safetensors.torch import load, save

    state = {"w": torch.randn(3, 4), "n": torch.tensor(5), "h": torch.randn(2, dtype=torch.float16),
             "e": torch.zeros(0, 3), "b": torch.tensor([True, False]), "d": torch.randn(2, 2, dtype=torch.float64)}
    path = tmp_path / "mixed.safetensors"
    path.write_bytes(save(state, metadata={"format": "pt"}))
    for _ in range(2):  # the header parsed, then taken from the cache
        read = zoo.read_checkpoint(path)
        assert list(read) == sorted(state) and read.floats is None  # three float dtypes: no single view
        for k, v in load(path.read_bytes()).items():
            assert read[k].dtype == v.dtype and read[k].shape == v.shape and torch.equal(read[k], v)
    floats = tmp_path / "floats.safetensors"
    floats.write_bytes(save({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}))
    read = zoo.read_checkpoint(floats)
    assert read.floats.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 1.0, 1.0, 1.0]
    read["b"][0] = float("nan")  # the one view sees every float tensor
    with pytest.raises(ValueError, match="NaN or infinite values in b"):
        zoo.check_finite(read)
    path.write_bytes(save(state)[:-3])  # truncated: safetensors says why
    with pytest.raises(ValueError, match="unreadable checkpoint \\(SafetensorError"):
        zoo.read_checkpoint(path)


def test_module_tensors_are_the_state_dicts_tensors():
    """The walk behind binding in-memory members: state_dict's keys, order and tensors (not copies), persistent
    buffers only, None parameters and children skipped."""
    from spectral_ext.zoo.members import module_tensors

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 5, bias=False)))
    model[2].register_buffer("scratch", torch.ones(2), persistent=False)
    model[2].register_buffer("kept", torch.ones(3))
    model[2].register_parameter("unused", None)
    model.add_module("absent", None)
    got, want = module_tensors(model), model.state_dict(keep_vars=True)
    assert list(got) == list(want) and all(got[k] is want[k] for k in want)


def test_in_memory_members_are_checked_at_once_and_the_bad_one_named():
    """model_metrics checks every member's tensors in one reduction; a NaN bias or running_var (which no
    spectrum reads) still fails, naming the tensor; so does one in a member of another shape."""
    from spectral_ext.zoo.members import all_finite_states, module_tensors

    def cnn(width=4):
        return torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                                   torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(width * 64, 3))

    x = torch.zeros(1, 1, 8, 8)
    for spoil, tensor in ((lambda m: m[0].bias, "0.bias"), (lambda m: m[1].running_var, "1.running_var"),
                          (lambda m: m[4].weight, "4.weight")):
        models = {f"m{i}": cnn() for i in range(5)}
        models["odd"] = cnn(6)
        for bad in ("m3", "odd"):
            spoiled = {k: v for k, v in models.items()}
            spoiled[bad] = cnn(6 if bad == "odd" else 4)
            with torch.no_grad():
                spoil(spoiled[bad]).view(-1)[1] = float("nan")
            assert not all_finite_states([module_tensors(m) for m in spoiled.values()])
            with pytest.raises(ValueError, match=f"NaN or infinite values in {tensor}"):
                zoo.model_metrics(spoiled, ("rank",), x)
    assert all_finite_states([module_tensors(m) for m in models.values()])
    assert all_finite_states([{"w": torch.ones(2)}, {"w": torch.ones(3)}, {"n": torch.tensor([1, 2])}])
    assert not all_finite_states([{"w": torch.ones(2)}, {"w": torch.tensor([1.0, 2.0, float("inf")])}])


def test_members_with_other_groups_but_the_same_weight_shapes_are_not_paired():
    """A (8, 4, 3, 3) weight is Conv2d(4, 8, 3) or Conv2d(8, 8, 3, groups=2): the same state keys and shapes,
    not the same map."""
    import copy

    from spectral_ext.layers import discover

    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.Conv2d(4, 8, 3), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 36, 2))
    grouped = copy.deepcopy(plain)
    grouped[1].groups = 2
    graph = discover(plain, torch.zeros(1, 1, 8, 8))
    assert graph.for_model(copy.deepcopy(plain)).maps["1"].module is not plain[1]
    with pytest.raises(ValueError, match="cannot be paired: map '1'"):
        graph.for_model(grouped)


def test_alpha_hats_are_alpha_hat_of_each_row():
    rng = torch.Generator().manual_seed(0)
    alpha = torch.rand(6, 4, generator=rng, dtype=torch.float64).numpy() * 3 + 1.5
    lambda_max = torch.rand(6, 4, generator=rng, dtype=torch.float64).numpy() * 10
    alpha[1, 2] = alpha[4] = float("nan")
    for convention in spectra.CONVENTIONS:
        rows = spectra.alpha_hats(alpha, lambda_max, convention)
        for r in range(6):
            usable = ~pd.isna(alpha[r])
            log = (lambda v: torch.tensor(v).log10()) if convention == "weightwatcher" else (lambda v: torch.tensor(v).log())
            terms = [a * float(log(l)) for a, l in zip(alpha[r][usable], lambda_max[r][usable])]
            want = (sum(terms) / len(terms) if convention == "weightwatcher" else sum(terms)) if terms else math.nan
            assert (math.isnan(rows[r]) and math.isnan(want)) or rows[r] == pytest.approx(want, rel=1e-14)
            assert spectra.alpha_hat_of(alpha[r], lambda_max[r], convention) == rows[r] or math.isnan(want)


def _binding_spies(monkeypatch):
    """Counters of the bindings (a checkpoint's state bound to the trace, a
    module bound by ModelGraph.for_model) and of the SVR's weight checks."""
    from spectral_ext import layers

    svr_module = sys.modules[se.svr_many.__module__]
    counts = {"state": 0, "module": 0, "svr_check": 0}

    def spy(owner, name, key):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    spy(zoo.members._Architecture, "bind", "state")
    spy(layers.ModelGraph, "for_model", "module")
    spy(svr_module, "_check_weights", "svr_check")
    return counts


def _edge_numbers(results):
    return [(r.internal_dimensions(k), int(r.significant(k).sum()), float(r.threshold(k)))
            for r in results for k in range(len(r.edges))]


def test_each_member_is_bound_and_checked_once_for_the_svr(zoo_dir, monkeypatch):
    """A zoo run binds and checks each member once (zoo.members); svr_many
    takes those graphs (graphs=) rather than binding and checking each again,
    with the numbers of binding them itself (graph=)."""
    names = [f"cnn_{i:02d}" for i in range(40)]
    models = [zoo.load_member(zoo_dir / f"{n}{'.safetensors' if int(n[-2:]) % 2 else '.pt'}", datasets.digits_cnn)
              for n in names]
    rebound = se.svr_many(models, graph=se.discover(models[0]), progress=False)  # binds and checks each itself
    counts = _binding_spies(monkeypatch)
    tables = zoo.analyze(zoo_dir, arch=ARCH, metrics=("svr",), progress=False)
    assert counts == {"state": 40, "module": 0, "svr_check": 0}  # the 40 good members, once each
    edges = tables["edges"].set_index("model")
    assert [(tuple(r[["d_out", "d_in"]]), r["n_significant"], r["threshold"]) for n in names
            for _, r in edges.loc[[n]].iterrows()] == _edge_numbers(rebound)
    # members in memory: the first is the trace, every other bound once; the SVR binds none again
    counts.update(state=0, module=0, svr_check=0)
    in_memory = zoo.model_metrics(dict(zip(names[:6], models[:6])), metrics=("svr",))
    assert counts == {"state": 0, "module": 5, "svr_check": 0}
    assert [(tuple(r[["d_out", "d_in"]]), r["n_significant"], r["threshold"]) for _, r in in_memory.edges.iterrows()] \
        == _edge_numbers(rebound[:6])


def test_svr_many_takes_bound_graphs():
    torch.manual_seed(0)
    models = [datasets.digits_cnn() for _ in range(3)]
    graph = se.discover(models[0])
    graphs = [graph] + [graph.for_model(m) for m in models[1:]]
    bound = se.svr_many(models, graphs=graphs, progress=False)
    rebound = se.svr_many(models, graph=graph, progress=False)
    assert all(r.graph is g for r, g in zip(bound, graphs))  # used as given
    for a, b in zip(bound, rebound):
        assert all(torch.equal(a.layers[n].S, b.layers[n].S) for n in graph.maps)
        assert all(torch.equal(a.adjacency(k), b.adjacency(k)) for k in range(len(a.edges)))
    with pytest.raises(ValueError, match="not both"):
        se.svr_many(models, graph=graph, graphs=graphs)
    with pytest.raises(ValueError, match="one ModelGraph per model: 3 models, 2 graphs"):
        se.svr_many(models, graphs=graphs[:2])
    with pytest.raises(TypeError, match=r"graphs\[1\] must be a ModelGraph"):
        se.svr_many(models, graphs=[graph, "x", graph])
    with pytest.raises(ValueError, match=r"graphs\[1\] has other maps"):
        se.svr_many(models[:2], graphs=[graph, se.discover(datasets.digits_mlp())])
