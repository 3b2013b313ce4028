"""Model zoos: hundreds to thousands of checkpoints analysed in batches, with
results written incrementally so an interrupted run resumes, and sharded
over processes under torchrun.

Per-model metrics (one row per model x layer, or model x edge for the SVR)
run batched over models of one architecture: the SVDs of a layer are one
call on the stacked weights of every model. Without an architecture
(Hugging Face model folders, LoRA adapters, state_dicts), rank and alpha
come from the weights alone, read one tensor at a time and batched over
the weights of one shape across members (metrics.weight_model_metrics). Pairwise metrics (CKA,
Procrustes) run on a probe dataset with each model's activations captured
once. Results go to <out>/chunks/<id>/<table>.<csv|parquet>, one folder per
finished chunk, made visible by an atomic rename: a killed run leaves no
partial rows, and a resumed one skips every model or pair already in a
finished chunk. Rank 0 merges the chunks into <out>/<table>.<fmt> and writes
<out>/report.md with figures.

The package, by concern: _base (ZooError, table and metric names), members
(finding, reading, checking and binding checkpoints), metrics (per-model and
pairwise metrics), storage (chunks, resumption, merging, options, lock),
distributed (torchrun), analysis (analyze and its phases), manifest (a zoo
folder's zoo.json), generator (a trained digits zoo, make_digits_zoo) and
report (report.md: metrics against accuracy, accuracy predicted from the
weights)."""
from ._base import MIN_PROBE, METRICS, PAIR_MEASURES, TABLES, WEIGHT_METRICS, ZooError, ZooTables
from .analysis import analyze, write_report
from .generator import DigitsZoo, make_digits_zoo
from .manifest import manifest_defaults, read_manifest
from .members import (CHECKPOINT_SUFFIXES, check_finite, list_members, load_member, model_folder, read_checkpoint,
                      read_member_weights, resolve_arch)
from .metrics import ActivationCache, model_metrics, pair_metrics, probe_parts, weight_model_metrics
from .storage import STRING_COLUMNS, check_metadata, check_out

__all__ = ["ActivationCache", "CHECKPOINT_SUFFIXES", "DigitsZoo", "METRICS", "MIN_PROBE", "PAIR_MEASURES",
           "STRING_COLUMNS", "TABLES", "ZooError", "ZooTables", "analyze", "check_finite", "check_metadata",
           "check_out", "list_members", "load_member", "make_digits_zoo", "manifest_defaults", "model_folder",
           "model_metrics", "pair_metrics", "probe_parts", "read_checkpoint", "read_manifest", "read_member_weights",
           "resolve_arch", "WEIGHT_METRICS", "weight_model_metrics", "write_report"]
