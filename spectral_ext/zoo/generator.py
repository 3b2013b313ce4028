"""A real trained model zoo made here: many CNNs of the Small CNN Zoo shape
(Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights",
section 3 and its released dataset: three 3x3 convolutions of 16 channels
with stride 2, global average pooling, a Linear to 10; 4,970 parameters on
one-channel images) trained on scikit-learn's 8x8 digits, hyperparameters
drawn per model as that zoo does, checkpoints at several epochs.

Models train together: their parameters are stacked along a model axis and
the convolutions run as one grouped convolution (a group per model), so one
step of 1,000 models costs about what one step of a wide network does. The
optimisers are written for stacked parameters (torch.optim takes one learning
rate per parameter group; a group per model would be 1,000 Python-level
updates per step). Groups of models are committed to disk one at a time: a
killed run resumes at the first unfinished group, with the same draws.

Folder layout (OUT):
    zoo.json                 manifest: architecture factory, checkpoints and metadata paths, settings
    checkpoints/m00042_e020.safetensors   model 42 after 20 epochs (epoch 0: the initialisation)
    metadata.parquet, metadata.csv        one row per checkpoint: hyperparameters, epoch, accuracies, losses
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from .manifest import FORMAT, MANIFEST, write_manifest

ARCH = "spectral_ext.zoo.generator:small_cnn"  # the factory its manifest names
ACTIVATIONS = ("relu", "tanh")
OPTIMIZERS = ("adam", "rmsprop", "sgd")
INITS = ("normal", "truncated_normal", "glorot_uniform", "he_normal", "orthogonal")
# The zoo's draws (section 3 and the released metrics.csv columns): log-uniform learning rate, L2
# coefficient and init std (used by the normal and truncated-normal inits), uniform dropout and training
# fraction; optimiser, init method and activation uniformly among the choices.
RANGES = {"learning_rate": (5e-4, 5e-2), "l2reg": (1e-8, 1e-2), "init_std": (1e-3, 0.5), "dropout": (0.0, 0.7),
          "train_fraction": (0.1, 1.0)}
HYPERPARAMETERS = ("seed", "learning_rate", "optimizer", "w_init", "init_std", "dropout", "l2reg",
                   "train_fraction", "activation")
WIDTH, CLASSES = 16, 10


class SmallCNN(nn.Sequential):
    """The Small CNN Zoo network for 1-channel images. Its activation (ReLU
    or tanh, a per-model hyperparameter) is kept in the buffer
    `activation_code` (0 relu, 1 tanh), so a checkpoint rebuilds the right
    network from the same factory."""

    def __init__(self, activation: str = "relu"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        act = nn.ReLU if activation == "relu" else nn.Tanh
        super().__init__(nn.Conv2d(1, WIDTH, 3, stride=2, padding=1), act(),
                         nn.Conv2d(WIDTH, WIDTH, 3, stride=2, padding=1), act(),
                         nn.Conv2d(WIDTH, WIDTH, 3, stride=2, padding=1), act(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, CLASSES))
        self.register_buffer("activation_code", torch.tensor(ACTIVATIONS.index(activation)))
        self.register_load_state_dict_post_hook(SmallCNN._set_activation)

    @property
    def activation(self) -> str:
        return ACTIVATIONS[int(self.activation_code)]

    @staticmethod
    def _set_activation(module, incompatible_keys):
        code = int(module.activation_code)
        if code not in (0, 1):
            raise ValueError(f"activation_code must be 0 (relu) or 1 (tanh), got {code}")
        for index in (1, 3, 5):
            module[index] = nn.ReLU() if code == 0 else nn.Tanh()


def small_cnn(activation: str = "relu") -> SmallCNN:
    """The architecture factory named in a generated zoo's manifest."""
    return SmallCNN(activation)


# ---------------------------------------------------------------------------------------------
# Hyperparameters


def draw_hyperparameters(index: int, seed: int = 0) -> dict:
    """Model `index`'s hyperparameters (Unterthiner et al. 2020 section 3),
    a function of (seed, index) only, so that a resumed or regrouped run
    draws the same ones (an int seed, not a generator: see make_digits_zoo)."""
    rng = np.random.default_rng([seed, index])

    def log_uniform(low, high):
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))

    return {"seed": int(rng.integers(2**31 - 1)),
            "learning_rate": log_uniform(*RANGES["learning_rate"]),
            "optimizer": OPTIMIZERS[rng.integers(len(OPTIMIZERS))],
            "w_init": INITS[rng.integers(len(INITS))],
            "init_std": log_uniform(*RANGES["init_std"]),
            "dropout": float(rng.uniform(*RANGES["dropout"])),
            "l2reg": log_uniform(*RANGES["l2reg"]),
            "train_fraction": float(rng.uniform(*RANGES["train_fraction"])),
            "activation": ACTIVATIONS[rng.integers(len(ACTIVATIONS))]}


def _init_model(h: dict) -> dict[str, torch.Tensor]:
    """One model's initial state_dict: kernels by h["w_init"] (init_std for the
    normal ones), biases zero, as the zoo's b_init."""
    g = torch.Generator().manual_seed(h["seed"])
    model = SmallCNN(h["activation"])
    for module in model:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight
            with torch.no_grad():
                if h["w_init"] == "normal":
                    nn.init.normal_(w, 0.0, h["init_std"], generator=g)
                elif h["w_init"] == "truncated_normal":
                    nn.init.trunc_normal_(w, 0.0, h["init_std"], -2 * h["init_std"], 2 * h["init_std"], generator=g)
                elif h["w_init"] == "glorot_uniform":
                    nn.init.xavier_uniform_(w, generator=g)
                elif h["w_init"] == "he_normal":
                    nn.init.kaiming_normal_(w, nonlinearity="relu", generator=g)
                else:
                    nn.init.orthogonal_(w, generator=g)
                module.bias.zero_()
    return model.state_dict()


# ---------------------------------------------------------------------------------------------
# Stacked training: parameter k of every model in one tensor with a leading model axis

KEYS = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias", "8.weight", "8.bias")


def _forward(params: dict[str, torch.Tensor], x: torch.Tensor, activation: str, dropout=None, g=None):
    """Logits (B, M, 10) of M stacked models with one activation on x:
    (B, M, 8, 8), model m seeing x[:, m] (its own batch), or (B, 1, 8, 8)
    shared by all."""
    M = params["0.weight"].shape[0]
    h = x.expand(x.shape[0], M, *x.shape[2:]) if x.shape[1] == 1 else x
    act = torch.relu if activation == "relu" else torch.tanh
    for layer in ("0", "2", "4"):
        w, b = params[f"{layer}.weight"], params[f"{layer}.bias"]
        h = act(F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), stride=2, padding=1, groups=M))
        if dropout is not None:
            keep = 1.0 - dropout.repeat_interleave(WIDTH).view(1, -1, 1, 1)
            h = h * ((torch.rand(h.shape, generator=g) < keep) / keep)
    h = h.mean((2, 3)).view(h.shape[0], M, WIDTH)
    return torch.einsum("bmc,moc->bmo", h, params["8.weight"]) + params["8.bias"]


def _losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (B, M) of logits (B, M, 10) against labels y (B, M)."""
    return -torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


class _StackedOptimizer:
    """Adam, RMSProp or plain SGD per model, with Keras' defaults (the
    zoo's): Adam betas (0.9, 0.999), RMSProp rho 0.9, eps 1e-7. One update
    rule with per-model coefficients covers the three (RMSProp: no first
    moment, no bias correction; SGD: no denominator), so no branch runs on
    the big tensors. A model whose `active` flag is off keeps its parameters
    and state."""

    def __init__(self, params, lr: torch.Tensor, kinds: list[str]):
        self.params, self.lr = params, lr
        self.beta1 = torch.tensor([0.9 if k == "adam" else 0.0 for k in kinds])
        self.beta2 = torch.tensor([0.999 if k == "adam" else 0.9 for k in kinds])
        self.adam = torch.tensor([k == "adam" for k in kinds], dtype=torch.float32)
        self.sgd = torch.tensor([k == "sgd" for k in kinds], dtype=torch.float32)
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}
        self.t = torch.zeros(len(kinds))

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], active: torch.Tensor):
        on = active.float()
        self.t += on
        t = self.t.clamp(min=1)
        b1 = self.beta1 * on + (1 - on)  # an inactive model: m <- 1 * m + 0 * g
        b2 = self.beta2 * on + (1 - on)
        c1 = torch.where(self.adam > 0, 1 - 0.9 ** t, torch.ones(()))
        c2 = torch.where(self.adam > 0, 1 - 0.999 ** t, torch.ones(()))
        step_size = self.lr * on / c1
        for k, p in self.params.items():
            shape = (-1,) + (1,) * (p.dim() - 1)
            g, m, v = grads[k], self.m[k], self.v[k]
            m.mul_(b1.view(shape)).add_(g * (1 - b1).view(shape))
            v.mul_(b2.view(shape)).add_(g * g * (1 - b2).view(shape))
            # SGD: denominator 1 (sgd flag * 1 + 0 * ...); the others: sqrt(v / c2) + eps
            denominator = (v / c2.view(shape)).sqrt_().add_(1e-7).mul_((1 - self.sgd).view(shape)).add_(
                self.sgd.view(shape))
            p.sub_(m / denominator * step_size.view(shape))


@torch.no_grad()
def _evaluate(params, activation, x, y, members=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model (accuracy, mean loss) on (x, y) shared by all, over the rows
    where members (N, M) is True (default all), in slices to bound memory."""
    M = params["0.weight"].shape[0]
    correct, loss, count = (torch.zeros(M, dtype=torch.float64) for _ in range(3))
    for start in range(0, x.shape[0], 256):
        xb, yb = x[start:start + 256], y[start:start + 256]
        logits = _forward(params, xb, activation)
        weight = torch.ones(xb.shape[0], M) if members is None else members[start:start + 256].float()
        correct += ((logits.argmax(-1) == yb.unsqueeze(1)).float() * weight).sum(0).double()
        loss += (_losses(logits, yb.unsqueeze(1).expand(-1, M)) * weight).sum(0).double()
        count += weight.sum(0).double()
    return correct / count, loss / count


def train_population(hyper: list[dict], x_train, y_train, x_test, y_test, epochs: int, checkpoints,
                     batch_size: int = 32, progress=None):
    """Train the models of `hyper` (all with one activation) together;
    yields (epoch, {key: stacked tensor}, rows) at each checkpoint epoch,
    rows holding each model's train/test accuracy and loss (train: on its
    own training subset)."""
    activations = {h["activation"] for h in hyper}
    if len(activations) != 1:
        raise ValueError(f"a population shares one activation, got {sorted(activations)}")
    activation = activations.pop()
    M, N = len(hyper), x_train.shape[0]
    n_own = [max(batch_size, int(round(h["train_fraction"] * N))) for h in hyper]
    # Models sorted by subset size, largest first: at every step the models still in their epoch are a
    # prefix, and only that prefix runs (a small training fraction is a short epoch).
    by_size = sorted(range(M), key=lambda i: -n_own[i])
    unsort = torch.tensor(by_size).argsort()
    hyper = [hyper[i] for i in by_size]
    n_own = torch.tensor([n_own[i] for i in by_size])
    states = [_init_model(h) for h in hyper]
    params = {k: torch.stack([s[k] for s in states]).requires_grad_(True) for k in KEYS}
    lr = torch.tensor([h["learning_rate"] for h in hyper])
    l2 = torch.tensor([h["l2reg"] for h in hyper])
    dropout = torch.tensor([h["dropout"] for h in hyper])
    g = torch.Generator().manual_seed(hyper[0]["seed"])
    # Each model's training subset: the first train_fraction of its own permutation of the training set.
    order = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(h["seed"] + 1)) for h in hyper])
    members = torch.zeros(M, N, dtype=torch.bool)
    members.scatter_(1, order, torch.arange(N).expand(M, N) < n_own.unsqueeze(1))
    steps_own = n_own // batch_size  # an epoch: one pass over the model's own subset (last partial batch dropped)
    optimizer = _StackedOptimizer(params, lr, [h["optimizer"] for h in hyper])
    wanted = sorted(set(checkpoints))

    def snapshot(epoch):
        test_acc, test_loss = _evaluate(params, activation, x_test, y_test)
        train_acc, train_loss = _evaluate(params, activation, x_train, y_train, members.T)
        rows = [{"epoch": epoch, "train_accuracy": float(train_acc[i]), "train_loss": float(train_loss[i]),
                 "test_accuracy": float(test_acc[i]), "test_loss": float(test_loss[i])} for i in unsort.tolist()]
        return epoch, {k: p.detach()[unsort].clone() for k, p in params.items()}, rows

    if 0 in wanted:
        yield snapshot(0)
    for epoch in range(1, max(wanted) + 1):  # no training past the last checkpoint
        # Shuffle each model's subset: random keys, non-members last; step s reads positions s*B..(s+1)*B.
        keys = torch.rand(M, N, generator=g) + (~members).float() * 2
        perm = keys.argsort(1)
        for step in range(int(steps_own.max())):
            active = step < steps_own
            a = int(active.sum())  # the prefix of models still in their epoch
            idx = perm[:a, step * batch_size:(step + 1) * batch_size].T  # (B, a)
            running = {k: p[:a] for k, p in params.items()}
            logits = _forward(running, x_train[idx].squeeze(2), activation, dropout[:a], g)
            per_model = _losses(logits, y_train[idx]).mean(0)
            penalty = sum((running[k] ** 2).flatten(1).sum(1) for k in KEYS if k.endswith("weight")) * l2[:a]
            loss = (per_model + penalty).sum()  # models are independent: one backward for all
            grads = dict(zip(KEYS, torch.autograd.grad(loss, [params[k] for k in KEYS])))
            optimizer.step(grads, active)
        if progress is not None:
            progress.update(M)
        if epoch in wanted:
            yield snapshot(epoch)


# ---------------------------------------------------------------------------------------------
# The zoo folder


@dataclasses.dataclass(frozen=True, eq=False)  # DataFrames have no single truth value
class DigitsZoo:
    """A trained digits zoo (make_digits_zoo): its folder, the manifest it
    wrote there (zoo.json) and its metadata table, one row per checkpoint
    (model, run, index, hyperparameters, epoch, train/test accuracy and
    loss, checkpoint path relative to the folder)."""

    folder: pathlib.Path
    manifest: dict
    table: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """The metadata table, one row per checkpoint."""
        return self.table


def _settings(n, epochs, checkpoints, seed, group_size, batch_size) -> dict:
    return {"n": n, "epochs": epochs, "checkpoints": sorted(set(checkpoints)), "seed": seed,
            "group_size": group_size, "batch_size": batch_size, "dataset": "sklearn.datasets.load_digits",
            "split": "spectral_ext.datasets.digits(generator=0): 80% train, 20% test"}


def make_digits_zoo(out, n: int = 1000, epochs: int = 12, checkpoints=(0, 1, 4, 12), seed: int = 0,
                    group_size: int = 250, batch_size: int = 32, progress: bool = True,
                    threads: int | None = None) -> DigitsZoo:
    """Train `n` Small-CNN-Zoo networks on scikit-learn's digits into the
    folder `out`.

    Hyperparameters per model as Unterthiner et al. 2020 section 3 draw them
    (see RANGES, OPTIMIZERS, INITS, ACTIVATIONS); checkpoints at the epochs
    in `checkpoints` (0 is the initialisation) as safetensors; metadata in
    Parquet and CSV: the model's name, run, hyperparameters, epoch,
    train/test accuracy and loss, checkpoint path. `group_size` models
    train at once; a killed run resumes at the first unfinished group (the
    same settings are required). zoo.json names the factory
    (spectral_ext.zoo.generator:small_cnn) so `spectral-ext zoo OUT` needs no
    other argument.

    seed stays an int, not a generator= (the API's form of randomness
    elsewhere): each model's seed is a recorded hyperparameter of the Small
    CNN Zoo (its metadata's `seed` column, drawn from (seed, index) by
    draw_hyperparameters), and a resumed run must draw the same ones, which
    a generator's state cannot promise across processes.

    Args:
        out: the zoo folder (created; a folder holding an unfinished run of
            the same settings is resumed).
        n: how many models.
        epochs: how many epochs each model trains.
        checkpoints: the epochs saved (0 is the initialisation).
        seed: the int every model's hyperparameters are drawn from.
        group_size: how many models train at once (and are committed
            together).
        batch_size: the minibatch size.
        progress: a progress bar over the model-epochs.
        threads: torch's intra-op threads while training (None keeps the
            current setting; on a busy machine 1 is several times faster
            than 2 for these small grouped convolutions).

    Returns:
        A DigitsZoo: the folder, its manifest and the metadata table
        (`.to_frame()`, one row per checkpoint).
    """
    from .. import datasets

    for name, value, low in (("n", n, 1), ("epochs", epochs, 0), ("group_size", group_size, 1),
                             ("batch_size", batch_size, 1), ("threads", threads, 1)):
        if name == "threads" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}{' or None' if name == 'threads' else ''}, "
                             f"got {value!r}")
    checkpoints = sorted(set(int(c) for c in checkpoints))
    if not checkpoints or checkpoints[0] < 0 or checkpoints[-1] > epochs:
        raise ValueError(f"checkpoints must be epochs between 0 and epochs={epochs}, got {checkpoints}")
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a folder, {out} is a file")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / ".groups").mkdir(exist_ok=True)
    settings = _settings(n, epochs, checkpoints, seed, group_size, batch_size)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text()).get("generator", {})
        if previous and previous != settings:
            raise ValueError(f"{out} holds a zoo made with other settings ({previous}); use another folder")
    _write_manifest(out, settings)
    x_train, y_train, x_test, y_test = datasets.digits()
    groups = [list(range(s, min(n, s + group_size))) for s in range(0, n, group_size)]
    todo = [k for k in range(len(groups)) if not (out / ".groups" / f"{k:05d}.parquet").exists()]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        _train_groups(out, groups, todo, seed, epochs, checkpoints, batch_size, progress,
                      (x_train, y_train, x_test, y_test))
    finally:
        torch.set_num_threads(previous_threads)
    table = pd.concat([pd.read_parquet(out / ".groups" / f"{k:05d}.parquet") for k in range(len(groups))],
                      ignore_index=True).sort_values(["index", "epoch"]).reset_index(drop=True)
    table.to_parquet(out / "metadata.parquet", index=False)
    table.to_csv(out / "metadata.csv", index=False)
    return DigitsZoo(out, _write_manifest(out, settings, complete=True), table)


def _train_groups(out, groups, todo, seed, epochs, checkpoints, batch_size, progress, data):
    """Train the groups `todo`, committing each (checkpoints, then its metadata part) before the next."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    x_train, y_train, x_test, y_test = data
    with tqdm(total=sum(len(groups[k]) for k in todo) * epochs, desc=f"training {sum(map(len, groups))} models",
              unit="model-epoch", disable=not progress) as bar:
        for k in todo:
            drawn = {i: draw_hyperparameters(i, seed) for i in groups[k]}
            rows = []
            for activation in ACTIVATIONS:  # one population per activation: no branch in the forward pass
                indices = [i for i in groups[k] if drawn[i]["activation"] == activation]
                if not indices:
                    continue
                hyper = [drawn[i] for i in indices]
                for epoch, params, scores in train_population(hyper, x_train, y_train, x_test, y_test, epochs,
                                                              checkpoints, batch_size, bar):
                    for j, i in enumerate(indices):
                        name = f"m{i:05d}_e{epoch:03d}"
                        state = {key: params[key][j].contiguous() for key in KEYS}
                        state["activation_code"] = torch.tensor(ACTIVATIONS.index(activation))
                        save_file(state, str(out / "checkpoints" / f"{name}.safetensors"))
                        rows.append({"model": name, "run": f"m{i:05d}", "index": i, **hyper[j], **scores[j],
                                     "checkpoint": f"checkpoints/{name}.safetensors"})
            part = out / ".groups" / f"{k:05d}.parquet"
            pd.DataFrame(rows).to_parquet(part.with_suffix(".tmp"), index=False)
            os.replace(part.with_suffix(".tmp"), part)  # the group is done only once this file exists


def _write_manifest(out: pathlib.Path, settings: dict, complete: bool = False) -> dict:
    manifest = {"format": FORMAT, "arch": ARCH, "arch_kwargs": {}, "checkpoints": "checkpoints",
                "metadata": "metadata.parquet", "accuracy": "test_accuracy", "complete": complete,
                "generator": settings}
    write_manifest(out, manifest)
    return manifest
