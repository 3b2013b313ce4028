"""Model zoos: batched metrics equal per-model ones, bad members become error
rows, interrupted runs resume without loss or duplication, torchrun shards
merge to the single-process result, and the command line."""
import math
import os
import pathlib
import subprocess
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
        model = datasets.train(datasets.digits_cnn(), x_train[:300], y_train[:300], epochs=1, seed=i)
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
    tables = zoo.analyze(zoo_dir, arch=ARCH, metrics=("rank", "alpha", "svr"), pairs=("cka", "grelu_procrustes"),
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
            if math.isnan(fit["alpha"]):
                assert math.isnan(rows.loc[layer, "alpha"])
            else:
                assert rows.loc[layer, "alpha"] == pytest.approx(fit["alpha"])
                alpha_hat += fit["alpha"] * math.log(rows.loc[layer, "lambda_max"])
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
        expected = se.cka(zoo._activations(ma, probe(), [layer])[layer], zoo._activations(mb, probe(), [layer])[layer])
    assert pairs.iloc[0]["value"] == pytest.approx(expected)


def test_each_model_runs_on_the_probe_once(zoo_dir, monkeypatch):
    runs = []
    original = zoo._activations
    monkeypatch.setattr(zoo, "_activations", lambda model, x, layers: runs.append(1) or original(model, x, layers))
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
                             {"epochs": 2, "seed": 1})
    result = se.stitch(models["cnn_00"], models["cnn_02"], "3", train_data=(probe[0][:100], probe[1][:100]),
                       test_data=(probe[0][100:], probe[1][100:]), kind="affine", epochs=2, lr=0.01, seed=1,
                       progress=False)
    assert frame["value"].iloc[0] == pytest.approx(result.penalty)
    with pytest.raises(zoo.ZooError, match="labelled probe"):
        zoo.pair_metrics(models, [("cnn_00", "cnn_02")], probe[0], ["3"], ("stitching",))


def test_interrupted_run_resumes_without_loss_or_duplicates(zoo_dir, tmp_path, monkeypatch):
    full = zoo.analyze(zoo_dir, arch=ARCH, metrics=("rank",), progress=False)
    calls = {"n": 0}
    original = zoo._process_chunk

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed mid-run
        return original(*args, **kwargs)

    monkeypatch.setattr(zoo, "_process_chunk", dies_on_third)
    out = tmp_path / "results"
    with pytest.raises(KeyboardInterrupt):
        zoo.analyze(zoo_dir, arch=ARCH, out=out, metrics=("rank",), chunk_size=8, progress=False)
    finished = [p for p in (out / "chunks").iterdir() if not p.name.startswith(".")]
    assert len(finished) == 2
    (out / "chunks" / ".half-written.tmp").mkdir()  # a chunk caught mid-write is ignored
    monkeypatch.setattr(zoo, "_process_chunk", original)
    seen = []
    monkeypatch.setattr(zoo, "_process_chunk", lambda chunk, *a, **k: seen.extend(n for n, _ in chunk) or original(chunk, *a, **k))
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
