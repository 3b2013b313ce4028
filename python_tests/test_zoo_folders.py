"""Zoos of Hugging Face model folders, LoRA adapters, safetensors files and
torch state_dicts without an architecture (issue 24, items 2, 4 and 6):
each member read as its weights, numbers equal to spectra.layer_spectra of
the member, bad members error rows naming the file and the tensor, the
dataflow metrics refused, and torchrun agents giving the one process's
tables."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch

from spectral_ext import spectra, zoo
from spectral_ext.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUMBERS = ["numerical_rank", "stable_rank", "spectral_norm", "lambda_max", "alpha", "xmin", "ks", "n_tail"]


def llama_state(seed: int, dtype=torch.float32, hidden: int = 32, layers: int = 2) -> dict:
    """A LLaMA-like state_dict (the names and shapes of transformers' LlamaForCausalLM: hidden 32,
    intermediate 64, 4 heads of which 2 key-value heads, vocabulary 64)."""
    generator = torch.Generator().manual_seed(seed)

    def weight(rows, cols):
        return (torch.randn(rows, cols, generator=generator) / cols ** 0.5).to(dtype)

    state = {"model.embed_tokens.weight": weight(64, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({p + "self_attn.q_proj.weight": weight(hidden, hidden),
                      p + "self_attn.k_proj.weight": weight(hidden // 2, hidden),
                      p + "self_attn.v_proj.weight": weight(hidden // 2, hidden),
                      p + "self_attn.o_proj.weight": weight(hidden, hidden),
                      p + "mlp.gate_proj.weight": weight(2 * hidden, hidden),
                      p + "mlp.up_proj.weight": weight(2 * hidden, hidden),
                      p + "mlp.down_proj.weight": weight(hidden, 2 * hidden),
                      p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
                      p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype)})
    state["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    state["lm_head.weight"] = weight(64, hidden)
    return state


def hf_folder(path: pathlib.Path, state: dict, layout: str = "single") -> pathlib.Path:
    """A Hugging Face model folder: config.json with model.safetensors ("single"), two shards and
    model.safetensors.index.json ("sharded"), or pytorch_model.bin ("bin")."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    if layout == "single":
        save_file(state, str(path / "model.safetensors"))
    elif layout == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        keys = list(state)
        shards = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for file, names in shards.items():
            save_file({k: state[k] for k in names}, str(path / file))
        index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def lora_folder(path: pathlib.Path, seed: int, dtype=torch.float32) -> pathlib.Path:
    """A PEFT LoRA adapter (r 4, lora_alpha 8) on q_proj and v_proj of two layers."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(2):
        for module, out in (("q_proj", 32), ("v_proj", 16)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, 32, generator=generator).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, 4, generator=generator).to(dtype)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["q_proj", "v_proj"]}))
    return path


def save_file(state, path: pathlib.Path):
    from safetensors.torch import save_file as save

    path.parent.mkdir(parents=True, exist_ok=True)
    save(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Every layout and dtype: member name -> its path."""
    root = tmp_path_factory.mktemp("mixed")
    members = {
        "hf_f32": hf_folder(root / "hf_f32", llama_state(0)),
        "hf_sharded_bf16": hf_folder(root / "hf_sharded_bf16", llama_state(1, torch.bfloat16), "sharded"),
        "runs/hf_bin_f16": hf_folder(root / "runs" / "hf_bin_f16", llama_state(2, torch.float16), "bin"),
        "lora": lora_folder(root / "lora", 3),
        "file_bf16": root / "file_bf16.safetensors",
        "state_f16": root / "state_f16.pt",
        "state_f32": root / "state_f32.pth",
        "state_bin": root / "state_bin.bin",
    }
    save_file(llama_state(4, torch.bfloat16), members["file_bf16"])
    save_file(llama_state(5, torch.float16), members["state_f16"])
    save_file(llama_state(6), members["state_f32"])
    save_file(llama_state(7), members["state_bin"])
    torch.save({"not": "a member"}, root / "hf_f32" / "optimizer.pt")  # a file of a model folder: not a member
    save_file(llama_state(8), root / ".hidden" / "skipped.safetensors")
    return root, members


def _member_rows(tables, name):
    return tables.layers[tables.layers["model"] == name].reset_index(drop=True)


def test_model_folders_and_adapters_are_one_member_each(mixed):
    root, members = mixed
    found = zoo.list_members(root)
    assert [n for n, _ in found] == sorted(members)
    assert {n: pathlib.Path(p) for n, p in found} == members
    assert zoo.list_members(members["hf_sharded_bf16"]) == [("hf_sharded_bf16", members["hf_sharded_bf16"])]
    assert zoo.members.model_folder(members["lora"]) == "lora"
    assert zoo.members.model_folder(members["runs/hf_bin_f16"]) == "huggingface"
    assert zoo.members.model_folder(root / "runs") is None


def test_every_layout_and_dtype_gives_the_numbers_of_layer_spectra(mixed):
    root, members = mixed
    tables = zoo.analyze(root, metrics=("rank", "alpha"), progress=False)
    models = tables.models.set_index("model")
    assert sorted(models.index) == sorted(members) and (models["error"] == "").all()
    assert list(tables.layers.columns) == ["model", "layer", "kind", "rows", "columns", "source", *NUMBERS, "note"]
    for name, path in members.items():
        expected = spectra.layer_spectra(path).to_frame()
        rows = _member_rows(tables, name)
        assert list(rows["layer"]) == list(expected["layer"]) and list(rows["kind"]) == list(expected["kind"])
        assert [tuple(s) for s in zip(rows["rows"], rows["columns"])] == list(expected["shape"])
        for column in NUMBERS:
            torch.testing.assert_close(torch.tensor(rows[column].to_numpy(float)),
                                       torch.tensor(expected[column].to_numpy(float)), rtol=1e-10, atol=0,
                                       equal_nan=True, msg=f"{name} {column}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers without a fit are named in a warning
            assert models.loc[name, "alpha_hat"] == pytest.approx(spectra.alpha_hat(expected), rel=1e-10)
        assert models.loc[name, "n_layers"] == len(expected)
        fitted = expected[(expected["kind"] != "embedding") & expected["alpha"].notna()]
        assert models.loc[name, "n_alpha_layers"] == len(fitted)
    lora = _member_rows(tables, "lora")
    assert (lora["kind"] == "lora").all() and (lora["numerical_rank"] == 4).all()
    assert lora["layer"].iloc[0] == "model.layers.0.self_attn.q_proj"
    sharded = _member_rows(tables, "hf_sharded_bf16").set_index("layer")
    assert sharded.loc["lm_head", "source"] == "hf_sharded_bf16/model-00002-of-00002.safetensors:lm_head.weight"
    assert _member_rows(tables, "state_f16")["source"].iloc[0].startswith("state_f16.pt:")
    # alpha_hat leaves the embeddings out: with them it differs
    hf = spectra.layer_spectra(members["hf_f32"]).to_frame()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert models.loc["hf_f32", "alpha_hat"] != pytest.approx(spectra.alpha_hat(hf, embeddings=True))


def test_rank_alone_has_the_rank_columns(mixed):
    root, members = mixed
    tables = zoo.analyze([members["hf_f32"], members["lora"]], metrics=("rank",), progress=False)
    assert list(tables.layers.columns) == ["model", "layer", "kind", "rows", "columns", "source", *NUMBERS[:4],
                                           "note"]
    assert "alpha_hat" not in tables.models and (tables.models["error"] == "").all()


def test_transformers_folders_single_and_sharded(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "zoo" / "single")
    model.save_pretrained(tmp_path / "zoo" / "sharded", max_shard_size="20KB")
    assert (tmp_path / "zoo" / "sharded" / "model.safetensors.index.json").exists()
    tables = zoo.analyze(tmp_path / "zoo", metrics=("rank", "alpha"), progress=False)
    assert sorted(tables.models["model"]) == ["sharded", "single"] and (tables.models["error"] == "").all()
    for name in ("single", "sharded"):
        expected = spectra.layer_spectra(tmp_path / "zoo" / name).to_frame()
        rows = _member_rows(tables, name)
        assert list(rows["layer"]) == list(expected["layer"])
        torch.testing.assert_close(torch.tensor(rows[NUMBERS].to_numpy(float)),
                                   torch.tensor(expected[NUMBERS].to_numpy(float)), rtol=1e-10, atol=0,
                                   equal_nan=True)
    a, b = (_member_rows(tables, n).set_index("layer")["lambda_max"] for n in ("single", "sharded"))
    pd.testing.assert_series_equal(a.sort_index(), b.sort_index(), rtol=1e-12)


@pytest.fixture
def bad_zoo(tmp_path):
    from safetensors.torch import save_file as save

    root = tmp_path / "zoo"
    hf_folder(root / "good", llama_state(0))
    truncated = hf_folder(root / "truncated_shard", llama_state(1), "sharded")
    data = (truncated / "model-00002-of-00002.safetensors").read_bytes()
    (truncated / "model-00002-of-00002.safetensors").write_bytes(data[:len(data) // 2])
    missing = hf_folder(root / "missing_tensor", llama_state(2), "sharded")
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    state = llama_state(3)
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save(state, str(root / "nan.safetensors"))
    state = llama_state(4, torch.bfloat16)
    state["model.layers.0.self_attn.k_proj.weight"][1, 2] = float("inf")
    hf_folder(root / "inf_shard", state, "sharded")
    state = llama_state(5)
    state["model.layers.0.mlp.up_proj.weight"] = torch.randint(-8, 8, (64, 32), dtype=torch.int8)
    state["model.layers.1.mlp.up_proj.weight"] = torch.randn(64, 32).to(torch.float8_e4m3fn)
    save(state, str(root / "quantised.safetensors"))
    (root / "text.pt").write_text("not a checkpoint\n")
    return root


def test_bad_members_are_rows_naming_the_file_and_the_tensor(bad_zoo):
    tables = zoo.analyze(bad_zoo, metrics=("rank", "alpha"), progress=False)
    errors = tables.models.set_index("model")["error"]
    assert errors["good"] == "" and errors["quantised"] == ""
    assert errors["truncated_shard"].startswith("truncated_shard/model-00002-of-00002.safetensors: not a readable "
                                                "safetensors file")
    assert errors["missing_tensor"] == ("missing_tensor: the shard index names tensors no shard holds: "
                                        "['model.layers.9.mlp.up_proj.weight']")
    assert errors["nan"] == ("nan.safetensors: the weight nan.safetensors:model.layers.1.mlp.up_proj.weight contains "
                             "NaN or infinite values")
    assert errors["inf_shard"] == ("inf_shard: the weight inf_shard/model-00001-of-00002.safetensors:"
                                   "model.layers.0.self_attn.k_proj.weight contains NaN or infinite values")
    assert errors["text"].startswith("text.pt: not a readable torch checkpoint")
    assert set(tables.layers["model"]) == {"good", "quantised"}
    quantised = _member_rows(tables, "quantised").set_index("layer")
    assert quantised.loc["model.layers.0.mlp.up_proj", "note"].startswith("int8: quantised")
    assert quantised.loc["model.layers.1.mlp.up_proj", "note"].startswith("float8_e4m3fn: quantised")
    assert quantised.loc["model.layers.0.mlp.up_proj", "source"] == \
        "quantised.safetensors:model.layers.0.mlp.up_proj.weight"
    assert quantised["alpha"].notna().sum() > 10  # the other tensors are analysed
    good = _member_rows(tables, "good")
    alone = spectra.layer_spectra(bad_zoo / "good").to_frame()
    torch.testing.assert_close(torch.tensor(good[NUMBERS].to_numpy(float)),
                               torch.tensor(alone[NUMBERS].to_numpy(float)),
                               rtol=1e-10, atol=0, equal_nan=True)


def test_the_command_line_on_a_folder_and_a_run_where_every_member_failed(mixed, bad_zoo, tmp_path, capsys):
    root, members = mixed
    out = tmp_path / "results"
    assert main(["zoo", str(root), "--metrics", "alpha,rank", "--out", str(out), "--no-report"]) == 0
    captured = capsys.readouterr()
    assert "8 members (0 with errors)" in captured.out
    assert "weights:" in captured.err and "B/s" in captured.err  # a bar over the bytes read
    assert len(pd.read_csv(out / "models.csv")) == 8
    assert json.loads((out / "options.json").read_text())["models"]["route"] == "weights"
    chunks, layers = sorted((out / "chunks").iterdir()), pd.read_csv(out / "layers.csv")
    # resumed: every member is done, nothing is computed again
    assert main(["zoo", str(root), "--metrics", "alpha,rank", "--out", str(out), "--quiet", "--no-report"]) == 0
    assert sorted((out / "chunks").iterdir()) == chunks
    pd.testing.assert_frame_equal(pd.read_csv(out / "layers.csv"), layers)
    assert main(["zoo", str(root), "--metrics", "rank", "--out", str(out), "--quiet"]) == 3  # other options
    assert "other models options" in capsys.readouterr().err
    bad = tmp_path / "all_bad"
    bad.mkdir()
    for name in ("nan.safetensors", "text.pt"):
        (bad / name).write_bytes((bad_zoo / name).read_bytes())
    assert main(["zoo", str(bad), "--metrics", "rank,alpha", "--out", str(tmp_path / "o"), "--quiet"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spectral-ext zoo: every member failed (2 of 2)")


@pytest.mark.parametrize("extra, says", [(["--metrics", "rank,svr"], "--arch: svr needs the models' dataflow"),
                                         (["--metrics", "svr", "--pairs", "cka", "--probe", "digits:16"],
                                          "--arch: svr and the pair measures need the models' dataflow"),
                                         (["--metrics", "rank", "--pairs", "cka", "--probe", "digits:16"],
                                          "--arch: the pair measures need the models' dataflow")])
def test_dataflow_metrics_without_arch_are_refused_before_any_work(mixed, tmp_path, capsys, monkeypatch, extra,
                                                                   says):
    root, _ = mixed
    monkeypatch.setattr(zoo.analysis, "_process_chunk", lambda *a, **k: pytest.fail("work started"))
    assert main(["zoo", str(root), "--out", str(tmp_path / "o"), "--quiet", *extra]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"spectral-ext zoo: {says}") and "pass arch" in err[0]
    assert not (tmp_path / "o" / "chunks").exists()
    with pytest.raises(zoo.ZooError) as info:
        zoo.analyze(root, metrics=("svr",), progress=False)
    assert info.value.argument == "arch"


def test_with_arch_a_model_folder_is_its_state_dict_and_pickled_modules_run_without(tmp_path):
    from spectral_ext import datasets

    torch.manual_seed(0)
    model = datasets.digits_mlp(width=8)
    hf_folder(tmp_path / "zoo" / "mlp_folder", {k: v.contiguous() for k, v in model.state_dict().items()})
    hf_folder(tmp_path / "zoo" / "mlp_sharded", {k: v.contiguous() for k, v in model.state_dict().items()}, "sharded")
    lora_folder(tmp_path / "zoo" / "adapter", 0)
    tables = zoo.analyze(tmp_path / "zoo", arch=lambda: datasets.digits_mlp(width=8), metrics=("rank",),
                         progress=False)
    errors = tables.models.set_index("model")["error"]
    assert errors["mlp_folder"] == "" and errors["mlp_sharded"] == ""
    assert "a LoRA adapter folder holds a low-rank update" in errors["adapter"]
    torch.save(model, tmp_path / "whole.pt")
    tables = zoo.analyze([tmp_path / "whole.pt"], metrics=("rank", "alpha"), allow_pickle=True, progress=False)
    assert (tables.models["error"] == "").all()
    assert list(tables.layers["layer"]) == list(spectra.layer_spectra(model).to_frame()["layer"])


_TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             "--rdzv_backend=c10d", "--local_addr=127.0.0.1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_give_the_tables_of_one_process(tmp_path):
    for i in range(4):
        hf_folder(tmp_path / "zoo" / f"llama_{i}", llama_state(10 + i, torch.bfloat16 if i % 2 else torch.float32),
                  "sharded" if i == 3 else "single")
    single = tmp_path / "single"
    assert main(["zoo", str(tmp_path / "zoo"), "--metrics", "rank,alpha", "--out", str(single), "--quiet"]) == 0
    double = tmp_path / "double"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    port = _free_port()
    agents = [subprocess.Popen([*_TORCHRUN, f"--node_rank={rank}", f"--rdzv_endpoint=127.0.0.1:{port}",
                                "-m", "spectral_ext", "zoo", str(tmp_path / "zoo"), "--metrics", "rank,alpha",
                                "--out", str(double), "--quiet"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [agent.communicate(timeout=180)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.communicate(timeout=30)
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    ranks = {p.name.split("-")[1] for p in (double / "chunks").iterdir()}
    assert ranks == {"0", "1"}  # each agent's worker analysed its share
    for table in ("models", "layers"):
        a = pd.read_csv(single / f"{table}.csv")
        b = pd.read_csv(double / f"{table}.csv")
        pd.testing.assert_frame_equal(a, b)
    assert len(pd.read_csv(single / "models.csv")) == 4


_PEAK = """
import resource, sys
from spectral_ext import spectra, zoo
spectra.WEIGHT_MEMORY = 16 << 20  # the float64 bytes of one batched Gram call
zoo.analyze(sys.argv[1], metrics=("rank",), progress=False)  # warm: imports and first allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tables = zoo.analyze(sys.argv[2], metrics=("rank",), progress=False, chunk_size=2)
assert (tables.models["error"] == "").all() and len(tables.layers) == 64, tables.models
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_chunk_of_members_holds_the_memory_budget_not_a_model_in_float64(tmp_path):
    """Two members of 32 float32 weights of 512 x 512 (32 MiB each on disk, 64 MiB each in float64), their
    64 weights of one shape batched across members within a 16 MiB budget: the peak is about twice the
    budget (spectra.weight_metrics' stack and its scaled copy), below one model in float64 (measured:
    +38 MiB; a 32 MiB budget gives +86 MiB; the default 256 MiB holds all 128 MiB of these two members
    at once, +248 MiB: the budget bounds the peak, the members' count does not)."""
    generator = torch.Generator().manual_seed(0)
    for i in range(2):
        hf_folder(tmp_path / "big" / f"m{i}", {f"layers.{k}.weight": torch.randn(512, 512, generator=generator)
                                              for k in range(32)})
    hf_folder(tmp_path / "warm" / "w", {"layers.0.weight": torch.randn(512, 512, generator=generator)})
    result = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "warm"), str(tmp_path / "big")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 0, result.stderr[-2000:]
    peak = int(result.stdout.strip())
    assert peak < 64 << 20, f"peak {peak / 2 ** 20:.0f} MiB: a model is 64 MiB in float64"
