"""Shared machinery: every benchmark runs the native path and the
straightforward PyTorch expression on the same input in the same run
(pytest-benchmark groups them), and the session ends with a table of
reference-time / native-time ratios."""
import os

# One thread per side unless the environment says otherwise: set before numpy, scipy and torch load their
# BLAS and OpenMP (OpenBLAS reads these once, when loaded; numpy's peers and spectral_ext's scipy syrk use it).
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def timed(fn, device):
    """fn, made to wait for the GPU so wall-clock timing is honest."""
    if device == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run
    return fn


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        impl = bench.extra_info.get("impl")
        if impl and bench.stats is not None:
            groups.setdefault(bench.group, {})[impl] = bench.stats.median
    terminalreporter.write_sep("=", "speed-up of native over each alternative (median time ratio)")
    for group, times in sorted(groups.items()):
        native = times.get("native")
        if not native:
            continue
        others = ", ".join(f"{name} {t / native:.2f}x" for name, t in sorted(times.items()) if name != "native")
        terminalreporter.write_line(f"{group:<60} native {native * 1e3:9.3f} ms | {others}")
