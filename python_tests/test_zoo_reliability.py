"""Zoo reliability (issue 27): a zoo folder runs no code unless trusted, bad
architectures and probes are one-line errors, odd checkpoints are error rows,
damaged result chunks are redone on resume, and a dead run's lock goes to
exactly one contender."""
import json
import multiprocessing
import os
import pathlib
import re
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch

from spectral_ext import datasets, zoo
from spectral_ext.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")

# A module a zoo.json can name: its top level leaves a marker, so a test sees whether it was imported.
HELPERS = '''
import pathlib
pathlib.Path(__file__).with_suffix(".imported").write_text("imported")
calls = []


def mlp8():
    from spectral_ext import datasets
    calls.append(1)
    return datasets.digits_mlp(width=8)


not_callable = 3


def raises():
    raise RuntimeError("boom")


def returns_text():
    return "not a model"


def needs_an_argument(width):
    return None
'''


def mlp8():
    return datasets.digits_mlp(width=8)


def _helpers(tmp_path, monkeypatch, name: str):
    """HELPERS as an importable module `name` (unique per test: sys.modules keeps what was imported)."""
    folder = tmp_path / "modules"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(folder))
    return folder / f"{name}.imported"


def _members(root: pathlib.Path, count: int = 3):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        torch.manual_seed(i)
        torch.save(mlp8().state_dict(), root / f"m{i}.pt")
    return root


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- 1. a zoo folder runs no code


def test_a_manifest_naming_os_abort_is_refused_not_run(tmp_path):
    folder = _members(tmp_path / "zoo", 1)
    (folder / "zoo.json").write_text(json.dumps({"arch": "os:abort", "checkpoints": "."}))
    run = subprocess.run([sys.executable, "-m", "spectral_ext", "zoo", str(folder), "--quiet"], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr[-2000:]  # not -6 (SIGABRT)
    line = _one_line(run.stderr)
    assert "'os:abort'" in line and "--trust-manifest" in line and "--arch" in line
    assert not (folder / "analysis" / "chunks").exists()


def test_a_manifest_callable_runs_only_when_trusted_or_given(tmp_path, monkeypatch, capsys):
    marker = _helpers(tmp_path, monkeypatch, "zoo_trust_helpers")
    folder = _members(tmp_path / "zoo")
    (folder / "zoo.json").write_text(json.dumps({"arch": "zoo_trust_helpers:mlp8", "checkpoints": "."}))
    with pytest.raises(zoo.ZooError, match="names the architecture 'zoo_trust_helpers:mlp8'.*trust_manifest=True"):
        zoo.analyze(folder, metrics=("rank",), progress=False)
    assert main(["zoo", str(folder), "--out", str(tmp_path / "refused"), "--quiet"]) == 3
    assert "--trust-manifest" in _one_line(capsys.readouterr().err)
    assert not marker.exists() and "zoo_trust_helpers" not in sys.modules  # not even imported
    assert main(["zoo", str(folder), "--out", str(tmp_path / "trusted"), "--quiet", "--trust-manifest"]) == 0
    assert "3 members (0 with errors)" in capsys.readouterr().out
    assert marker.exists() and sys.modules["zoo_trust_helpers"].calls  # the manifest's factory built the models
    tables = zoo.analyze(folder, arch=mlp8, metrics=("rank",), progress=False, report=False)  # given, not read
    assert (tables.models["error"] == "").all()
    with pytest.raises(zoo.ZooError, match="trust_manifest must be True or False"):
        zoo.analyze(folder, metrics=("rank",), progress=False, trust_manifest="yes")


def test_a_manifest_may_name_a_torchvision_model_or_this_packages_factories(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    import importlib

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    folder = _members(tmp_path / "zoo", 1)
    for arch in ("resnet18", "spectral_ext.datasets:digits_mlp"):
        (folder / "zoo.json").write_text(json.dumps({"arch": arch, "arch_kwargs": {"num_classes": 7}
                                                     if arch == "resnet18" else {"width": 8}}))
        _, factory, _ = zoo.manifest_defaults(folder)
        assert callable(factory)
    assert factory()[1].out_features == 8  # the kwargs reach the factory
    assert imported == ["spectral_ext.datasets"]
    (folder / "zoo.json").write_text(json.dumps({"arch": "resnet18", "arch_kwargs": [1]}))
    with pytest.raises(zoo.ZooError, match="arch_kwargs must be a JSON object"):
        zoo.manifest_defaults(folder)


# --------------------------------------------------------------------------- 2. bad --arch and --threads


@pytest.mark.parametrize("function, reason", [("not_callable", "is not callable"),
                                              ("raises", "failed to build a model (RuntimeError: boom)"),
                                              ("returns_text", "must return an nn.Module, it returned a str"),
                                              ("needs_an_argument", "failed to build a model (TypeError")])
def test_an_unusable_arch_is_one_line_and_exit_3(tmp_path, monkeypatch, capsys, function, reason):
    _helpers(tmp_path, monkeypatch, f"zoo_arch_{function}")
    folder = _members(tmp_path / "zoo", 2)
    monkeypatch.setattr(zoo.analysis, "_process_chunk", lambda *a, **k: pytest.fail("work started"))
    arch = f"zoo_arch_{function}:{function}"
    assert main(["zoo", str(folder), "--arch", arch, "--out", str(tmp_path / "o"), "--quiet"]) == 3
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("spectral-ext zoo: --arch: ") and arch in line and reason in line
    with pytest.raises(zoo.ZooError, match=re.escape(reason)) as caught:
        zoo.analyze(folder, arch=arch, metrics=("rank",), progress=False)
    assert caught.value.argument == "arch"
    assert main(["svr", str(folder / "m0.pt"), "--arch", arch]) == 3
    assert reason in _one_line(capsys.readouterr().err)


def test_make_zoo_threads_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["make-zoo", str(tmp_path / "z"), "--n", "2", "--epochs", "1", "--checkpoints", "1", "--threads", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "argument --threads: must be an integer >= 1, got 0" in err
    assert not (tmp_path / "z").exists()


# --------------------------------------------------------------------------- 3. a probe the models cannot take


def test_a_probe_the_models_cannot_take_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    folder = _members(tmp_path / "zoo")
    torch.save(torch.zeros(16, 5), tmp_path / "wrong_shape.pt")
    for name in ("_process_chunk", "_process_pairs", "_commit_chunk"):
        monkeypatch.setattr(zoo.analysis, name, lambda *a, **k: pytest.fail("work started before the probe check"))
    for metrics in ("rank", "none"):
        assert main(["zoo", str(folder), "--arch", f"{__name__}:mlp8", "--metrics", metrics, "--pairs", "cka",
                     "--probe", str(tmp_path / "wrong_shape.pt"), "--out", str(tmp_path / "o"), "--quiet"]) == 3
        line = _one_line(capsys.readouterr().err)
        assert line.startswith("spectral-ext zoo: --probe: probe inputs of shape (5,)")
        assert "which take inputs of shape (64,)" in line
    with pytest.raises(zoo.ZooError, match=r"probe inputs of shape \(5,\) \(float32\) do not fit the models, which "
                                           r"take inputs of shape \(64,\)"):
        zoo.analyze(folder, arch=mlp8, metrics=("rank",), pairs=("cka",), probe=torch.zeros(16, 5), progress=False)
    models = {f"m{i}": mlp8() for i in range(3)}  # in-memory members: the first one is run
    with pytest.raises(zoo.ZooError, match="do not fit the models") as caught:
        zoo.analyze(models, metrics=("rank",), pairs=("cka",), probe=torch.zeros(16, 5), progress=False)
    assert caught.value.argument == "probe"
    assert all(m.training for m in models.values())  # given back in the mode they came in


# --------------------------------------------------------------------------- 4. odd checkpoints are error rows


def test_integer_weights_and_text_files_are_error_rows_naming_the_file(tmp_path):
    folder = _members(tmp_path / "zoo")
    state = mlp8().state_dict()
    torch.save({k: (v * 100).long() for k, v in state.items()}, folder / "integers.pt")
    torch.save({k: v.half() for k, v in state.items()}, folder / "half.pt")  # cast, as load_state_dict does
    (folder / "notes.pth").write_text("hello world\nthis is text\n")
    (folder / "popper.pth").write_text("a text file\n")
    (folder / "empty.pt").write_bytes(b"")
    tables = zoo.analyze(folder, arch=mlp8, metrics=("rank", "alpha"), pairs=("cka",),
                         probe=datasets.digits()[2][:32].reshape(32, -1), progress=False, report=False)
    errors = tables.models.set_index("model")["error"]
    assert errors["integers"] == ("integers.pt: checkpoint tensor 1.weight holds int64 values, the architecture "
                                  "a float32 tensor")
    assert errors["notes"].startswith("notes.pth: unreadable checkpoint (not a PyTorch checkpoint: a text file")
    assert errors["popper"].startswith("popper.pth: unreadable checkpoint (not a PyTorch checkpoint: a text file")
    assert errors["empty"] == "empty.pt: unreadable checkpoint (an empty file, not a PyTorch checkpoint)"
    good = ["half", "m0", "m1", "m2"]
    assert (errors[good] == "").all() and sorted(set(tables.layers["model"])) == good
    assert len(tables.pairs[["model_a", "model_b"]].drop_duplicates()) == 6  # the good members' pairs
    model = zoo.load_member(folder / "half.pt", mlp8)
    assert model[1].weight.dtype == torch.float32
    with pytest.raises(ValueError, match="1.weight holds int64 values"):
        zoo.load_member(folder / "integers.pt", mlp8)


def test_a_run_where_every_member_failed_exits_3(tmp_path, capsys):
    folder = tmp_path / "zoo"
    folder.mkdir()
    for name in ("a.pth", "b.pth"):
        (folder / name).write_text("not a checkpoint\n")
    torch.save({k: v.long() for k, v in mlp8().state_dict().items()}, folder / "c.pt")
    out = tmp_path / "o"
    assert main(["zoo", str(folder), "--arch", f"{__name__}:mlp8", "--out", str(out), "--quiet"]) == 3
    line = _one_line(capsys.readouterr().err)
    assert line == ("spectral-ext zoo: every member failed (3 of 3); the most common reason (2 of them): unreadable "
                    "checkpoint (not a PyTorch checkpoint: a text file starting b'not a checkp'); see "
                    f"{out}/models.csv")
    assert len(pd.read_csv(out / "models.csv")) == 3  # the tables are still written


# --------------------------------------------------------------------------- 5. damaged chunks are redone


def test_a_damaged_chunk_is_verified_and_redone_on_resume(tmp_path):
    torch.manual_seed(0)
    members = {f"m{i}": mlp8() for i in range(6)}
    options = dict(metrics=("rank",), pairs=("cka",), probe=datasets.digits()[2][:32].reshape(32, -1), chunk_size=2,
                   progress=False, report=False)
    out = tmp_path / "results"
    first = zoo.analyze(members, out=out, **options)
    assert len(first.pairs[["model_a", "model_b"]].drop_duplicates()) == 15
    for table in zoo.TABLES:
        (out / f"{table}.csv").unlink()
    chunks = sorted((out / "chunks").iterdir())
    pairs_chunk = next(c for c in chunks if c.name.startswith("pairs-"))
    data = (pairs_chunk / "pairs.csv").read_bytes()
    (pairs_chunk / "pairs.csv").write_bytes(data[:len(data) // 2])  # a disk that lost the end of a file
    models_chunk = next(c for c in chunks if c.name.startswith("models-"))
    (models_chunk / "chunk.json").unlink()  # no record: not trusted either
    with pytest.warns(RuntimeWarning, match="is not as it was committed") as caught:
        again = zoo.analyze(members, out=out, **options)
    reasons = " ".join(str(w.message) for w in caught)
    assert "pairs.csv has" in reasons and "no record chunk.json" in reasons
    for table, keys in (("models", ["model"]), ("layers", ["model", "layer"]),
                        ("pairs", ["model_a", "model_b", "layer", "measure"])):
        pd.testing.assert_frame_equal(again[table].sort_values(keys).reset_index(drop=True),
                                      first[table].sort_values(keys).reset_index(drop=True), check_dtype=False)
    assert sorted(p.name[len(".bad-"):] for p in (out / "chunks").iterdir() if p.name.startswith(".bad-")) == \
        sorted([pairs_chunk.name, models_chunk.name])  # set aside, kept for inspection
    assert zoo.storage._verify_chunks(out, "csv") == []  # the redone chunks carry their records


def test_a_chunk_record_checks_rows_and_bytes(tmp_path):
    from spectral_ext.zoo import storage

    frame = pd.DataFrame({"model": ["a", "b"], "error": ["", ""]})
    storage._commit_chunk(tmp_path, "models-0", {"models": frame}, "csv")
    chunk = storage._chunk_folders(tmp_path)[0]
    record = json.loads((chunk / "chunk.json").read_text())["tables"]["models"]
    assert record["rows"] == 2 and len(record["sha256"]) == 64
    assert storage._chunk_fault(chunk, "csv") is None
    (chunk / "models.csv").write_text((chunk / "models.csv").read_text().replace("a,", "x,"))  # same size
    assert storage._chunk_fault(chunk, "csv") == "models.csv does not match its checksum"
    (chunk / "models.csv").unlink()
    assert storage._chunk_fault(chunk, "csv") == "models.csv is missing"


# --------------------------------------------------------------------------- 6. one writer takes a dead run's lock


def _contender(out, rounds, index, barrier, wins):
    from spectral_ext.zoo.storage import _Lock

    for r in range(rounds):
        barrier.wait(timeout=30)  # the parent has left a dead run's lock
        lock = _Lock(pathlib.Path(out))
        try:
            lock.acquire()
            wins[r * 8 + index] = 1
        except Exception:  # refused (ZooError): the lock is held
            wins[r * 8 + index] = 0
        barrier.wait(timeout=30)  # every contender has tried: the winner still holds it
        lock.release()
        barrier.wait(timeout=30)


def test_exactly_one_of_eight_contenders_takes_a_dead_runs_lock(tmp_path):
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    rounds, contenders = 1000, 8
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    stale = json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"})
    barrier = context.Barrier(contenders + 1)
    wins = context.Array("i", [-1] * (rounds * contenders))
    workers = [context.Process(target=_contender, args=(str(tmp_path), rounds, i, barrier, wins))
               for i in range(contenders)]
    for w in workers:
        w.start()
    try:
        for _ in range(rounds):
            (tmp_path / ".lock").write_text(stale)  # a dead run's lock, no flock held
            for _ in range(3):
                barrier.wait(timeout=60)
    finally:
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.kill()
                w.join(timeout=10)
    counts = [sum(wins[r * contenders:(r + 1) * contenders]) for r in range(rounds)]
    assert all(w.exitcode == 0 for w in workers)
    assert counts == [1] * rounds, f"rounds with another count of winners than one: {counts}"
