import contextlib
import os

import pytest
import torch

# Under pytest-xdist (`-n 2`) each worker is one of the cores: one torch thread each, not two
# workers each starting two threads on two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_report_header(config):
    import spectral_ext

    return f"spectral_ext build: {spectral_ext.build_info()}"


def interrupted(setup: str, call: str, delay: float = 1.0, timeout: float = 120.0):
    """Run `setup` then `call` (a long native loop) in a subprocess, send it
    SIGINT `delay` seconds into the call and return (what it printed after,
    its exit code, the seconds from the signal to that line): how long the
    loop takes to honour Ctrl-C ("interrupted" and 0 when it did).

    The child installs Python's SIGINT handler itself: a shell starts its
    background jobs (`make test &`, nohup) with SIGINT ignored, and Python then
    installs none. Every read and wait has a deadline; a child still running
    at `timeout` seconds is killed and reported as ("", None, inf)."""
    import selectors
    import signal
    import subprocess
    import sys
    import time

    script = ("import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
              f"import sys, torch, spectral_ext as se\n{setup}\nprint('ready', flush=True)\n"
              f"try:\n    {call}\nexcept KeyboardInterrupt:\n    print('interrupted', flush=True)\n"
              "    sys.exit(0)\nsys.exit(5)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)

            def readline():  # one line, or "" at the deadline (the child is then killed below)
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    return ""
                return proc.stdout.readline()

            if readline().strip() != "ready":
                return "", None, float("inf")
            time.sleep(delay)
            sent = time.perf_counter()
            proc.send_signal(signal.SIGINT)
            line = readline()  # printed as soon as the call has unwound
            waited = time.perf_counter() - sent if line else float("inf")
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            return line.strip(), proc.returncode, waited
    except subprocess.TimeoutExpired:
        return "", None, float("inf")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def unbiased_hsic(X, Y):
    """Song et al.'s unbiased HSIC of features X, Y (N, d) in float64, written out with ones
    vectors: the independent formula the CKA adapters are checked against."""
    K, L = X @ X.T, Y @ Y.T
    K, L = K - torch.diag(torch.diag(K)), L - torch.diag(torch.diag(L))
    n, one = K.shape[0], torch.ones(K.shape[0], 1, dtype=torch.float64)
    value = torch.trace(K @ L) + (one.T @ K @ one * (one.T @ L @ one)).item() / ((n - 1) * (n - 2)) \
        - 2 / (n - 2) * (one.T @ K @ L @ one).item()
    return float(value) / (n * (n - 3))


def minibatch_cka(batches):
    """[NRK21] eq. 3: unbiased HSIC summed over batches, then normalised. batches yields
    (features of model 1's layers, features of model 2's layers) per batch -> (layers1, layers2)."""
    import numpy as np

    xy = xx = yy = None
    for f1, f2 in batches:
        if xy is None:
            xy, xx, yy = np.zeros((len(f1), len(f2))), np.zeros(len(f1)), np.zeros(len(f2))
        for i, a in enumerate(f1):
            xx[i] += unbiased_hsic(a, a)
            for j, b in enumerate(f2):
                xy[i, j] += unbiased_hsic(a, b)
        for j, b in enumerate(f2):
            yy[j] += unbiased_hsic(b, b)
    return xy / np.sqrt(np.outer(xx, yy))


@contextlib.contextmanager
def in_float64(*models):
    """A package's own code run in float64: models, inputs and its accumulators (tensors of the default
    dtype), for the compat tests that compare against a peer's formula in float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    for m in models:
        m.double()
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
        for m in models:
            m.float()


def cheap_model(name, **kwargs):
    """A torchvision model without its random initialisation (the values do
    not matter to the dataflow): built on the meta device, then zeroed. Its
    init (VGG16's 4096 x 25088 classifier: seconds on 2 cores) is skipped."""
    import torchvision

    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        # integer buffers (index tables) must hold their real values; a BatchNorm's counter starts at 0
        if any(not b.is_floating_point() and not n.endswith("num_batches_tracked") for n, b in model.named_buffers()):
            raise NotImplementedError
        model = model.to_empty(device="cpu")
    except NotImplementedError:  # a constructor that copies data: build it for real
        return torchvision.models.get_model(name, weights=None, **kwargs).eval()
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.zero_()
    return model.eval()


@pytest.fixture(scope="session")
def trained_digits_mlp():
    """(trained, initial, (x_train, y_train), (x_test, y_test)): the digits MLP
    (width 64, seed 0, 15 epochs of Adam), trained once per session for every
    test that needs a trained network and its initialisation (96-97% test
    accuracy). Tests must not change it (deep-copy to edit)."""
    import copy

    from spectral_ext import datasets

    x_train, y_train, x_test, y_test = datasets.digits()
    torch.manual_seed(0)
    model = datasets.digits_mlp(width=64)
    initial = copy.deepcopy(model)
    datasets.train(model, x_train, y_train, epochs=15)
    return model, initial, (x_train, y_train), (x_test, y_test)
