"""Hugging Face model folders for the folder benchmarks (benchmarks/peers/test_bench_folders.py):
random bf16 weights (normal, std 0.02) with the shapes of public configs, written with safetensors
directly (no model is built), sharded as the hub shards: model-0000k-of-0000n.safetensors files of at
most --max-shard-size bytes filled in the model's tensor order, and a model.safetensors.index.json
whose weight_map is sorted by name (as transformers writes it); a folder under that size is one
model.safetensors without an index. Each folder gets a config.json (written last: a folder with one is
complete and is not written again).

- qwen2_0.5b: Qwen2-0.5B's shapes (24 layers, hidden 896, intermediate 4864, 14 query heads and 2
  key-value heads of 64, q/k/v biases, vocabulary 151,936, tied embeddings: no lm_head), 494M
  parameters, 0.99 GB in bf16. (The hub stores this model as one 988 MB file; at the default
  --max-shard-size of 500MB it is two shards here, so that the benchmark reads through a shard index.)
- tinyllama_1.1b: TinyLlama-1.1B's (22 layers, 2048 / 5632, 32 query heads and 4 key-value heads of
  64, vocabulary 32,000, an untied lm_head), 1.10B parameters, 2.2 GB (five shards).
- llama_zoo/ckpt_00 ... ckpt_15: 16 checkpoints of a small LLaMA (8 layers, 512 / 1376, 8 heads of
  64, vocabulary 32,000, untied), 59M parameters, 118 MB each (one model.safetensors), seeds 0-15.

Run: python benchmarks/make_folders.py OUT [--only qwen2_0.5b,tinyllama_1.1b,llama_zoo]
[--max-shard-size 500MB]. Generation is deterministic (one torch.Generator seeded per tensor) and takes
about 1 s per 100M parameters on one core."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

STD = 0.02

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
         "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
         "head_dim": 64, "vocab_size": 151936, "tie_word_embeddings": True, "attention_bias": True,
         "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
         "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16"}
TINYLLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
             "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
             "head_dim": 64, "vocab_size": 32000, "tie_word_embeddings": False, "attention_bias": False,
             "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
             "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
SMALL_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
               "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
               "head_dim": 64, "vocab_size": 32000, "tie_word_embeddings": False, "attention_bias": False,
               "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
               "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
ZOO_SIZE = 16
MODELS = ("qwen2_0.5b", "tinyllama_1.1b", "llama_zoo")


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Qwen2 / LLaMA causal LM in the model's order."""
    h, inter, heads, kv = (config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                               "num_key_value_heads"))
    d = config.get("head_dim", h // heads)
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.append((p + "input_layernorm.weight", (h,)))
        for proj, out in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
            shapes.append((p + f"self_attn.{proj}.weight", (out, h)))
            if config.get("attention_bias"):
                shapes.append((p + f"self_attn.{proj}.bias", (out,)))
        shapes += [(p + "self_attn.o_proj.weight", (h, heads * d)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter))]
    shapes.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings"):
        shapes.append(("lm_head.weight", (config["vocab_size"], h)))
    return shapes


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not match:
        raise ValueError(f"--max-shard-size: a size such as 500MB, got {text!r}")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match.group(2)]
    return int(float(match.group(1)) * unit)


def _tensor(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """bf16 normal(0, STD) weights (norm scales: ones, biases: zeros), the same for the same (seed, name)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
    return (torch.randn(shape, generator=generator) * STD).to(torch.bfloat16)


def write_folder(folder: str, config: dict, seed: int = 0, max_shard_size: int = parse_size("500MB"),
                 quiet: bool = False) -> str:
    """A Hugging Face folder of `config`'s tensors (random, bf16), sharded at max_shard_size; kept as it is
    when its config.json exists (written last)."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    shapes = tensor_shapes(config)
    shards, size = [[]], 0
    for name, shape in shapes:
        nbytes = 2 * int(torch.tensor(shape).prod()) if shape else 2
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    total = sum(2 * int(torch.tensor(s).prod()) for _, s in shapes)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        tensors = {name: _tensor(name, shape, seed) for name, shape in shard}
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
        if not quiet:
            print(f"  {os.path.join(folder, file)}", file=sys.stderr)
    if len(files) > 1:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}, handle, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    return folder


def qwen2(out: str, **kwargs) -> str:
    return write_folder(os.path.join(out, "qwen2_0.5b"), QWEN2, seed=0, **kwargs)


def tinyllama(out: str, **kwargs) -> str:
    return write_folder(os.path.join(out, "tinyllama_1.1b"), TINYLLAMA, seed=0, **kwargs)


def llama_zoo(out: str, n: int = ZOO_SIZE, **kwargs) -> str:
    """n checkpoints of the small LLaMA, seeds 0..n-1, as out/llama_zoo/ckpt_00 ..."""
    root = os.path.join(out, "llama_zoo")
    for seed in range(n):
        write_folder(os.path.join(root, f"ckpt_{seed:02d}"), SMALL_LLAMA, seed=seed, **kwargs)
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder to write them in")
    parser.add_argument("--only", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--max-shard-size", default="500MB", type=parse_size)
    args = parser.parse_args(argv)
    makers = {"qwen2_0.5b": qwen2, "tinyllama_1.1b": tinyllama, "llama_zoo": llama_zoo}
    only = [m for m in args.only.split(",") if m]
    unknown = [m for m in only if m not in makers]
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(1)
    for name in only:
        print(makers[name](args.out, max_shard_size=args.max_shard_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
