"""Training a digits zoo: the generator's stacked training (every model of a
population in one grouped convolution, one backward, one stacked optimiser
step) against the straightforward loop (one nn.Module and one torch.optim
optimiser per model), per model-epoch, one epoch on the full training set."""
import pytest
import torch

from spectral_ext import datasets
from spectral_ext.zoo import generator as zg

MODELS = 32


def population(count):
    base = dict(zg.draw_hyperparameters(0), optimizer="adam", activation="relu", train_fraction=1.0, dropout=0.1)
    return [dict(base, seed=base["seed"] + i) for i in range(count)]


def stacked(data, hyper):
    x_train, y_train, x_test, y_test = data
    return list(zg.train_population(hyper, x_train, y_train, x_test, y_test, epochs=1, checkpoints=(1,)))


def looped(data, hyper):
    """The per-model loop a user writes: the same network, dropout, L2 and Adam."""
    x_train, y_train, _, _ = data
    for h in hyper:
        model = zg.small_cnn()
        model.load_state_dict(zg._init_model(h))
        layers = list(model)
        drop = torch.nn.Dropout(h["dropout"])
        net = torch.nn.Sequential(*layers[:2], drop, *layers[2:4], torch.nn.Dropout(h["dropout"]), *layers[4:6],
                                  torch.nn.Dropout(h["dropout"]), *layers[6:])
        opt = torch.optim.Adam(model.parameters(), lr=h["learning_rate"], eps=1e-7)
        g = torch.Generator().manual_seed(h["seed"])
        net.train()
        for batch in torch.randperm(len(y_train), generator=g).split(32)[:len(y_train) // 32]:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x_train[batch]), y_train[batch])
            loss = loss + h["l2reg"] * sum((p ** 2).sum() for n, p in model.named_parameters() if n.endswith("weight"))
            loss.backward()
            opt.step()


@pytest.mark.parametrize("impl", ["native", "loop"])
def test_zoo_training_one_epoch(benchmark, impl):
    torch.set_num_threads(1)
    data, hyper = datasets.digits(), population(MODELS)
    benchmark.group = f"zoo training: {MODELS} models, one epoch"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(stacked if impl == "native" else looped, args=(data, hyper), rounds=3, iterations=1)


if __name__ == "__main__":  # interleaved repeats for benchmarks/RESULTS.md: wall and CPU seconds, medians
    import statistics
    import time

    torch.set_num_threads(1)
    data, hyper = datasets.digits(), population(MODELS)
    times = {"stacked": [], "loop": []}
    for _ in range(5):
        for name, fn in (("stacked", stacked), ("loop", looped)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn(data, hyper)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    for name, runs in times.items():
        print(f"{name}: median wall {statistics.median(r[0] for r in runs):.2f} s, "
              f"median cpu {statistics.median(r[1] for r in runs):.2f} s for {MODELS} model-epochs")
    ratio = statistics.median(b[1] / a[1] for a, b in zip(times["stacked"], times["loop"]))
    print(f"loop / stacked CPU time, median of paired ratios: {ratio:.2f}x")
