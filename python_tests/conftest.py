import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_report_header(config):
    import spectral_ext

    return f"spectral_ext build: {spectral_ext.build_info()}"


def interrupted(setup: str, call: str, delay: float = 1.0):
    """Run `setup` then `call` (a long native loop) in a subprocess, send it
    SIGINT `delay` seconds into the call and return (what it printed after,
    its exit code, the seconds from the signal to that line): how long the
    loop takes to honour Ctrl-C ("interrupted" and 0 when it did)."""
    import signal
    import subprocess
    import sys
    import time

    script = (f"import sys, torch, spectral_ext as se\n{setup}\nprint('ready', flush=True)\n"
              f"try:\n    {call}\nexcept KeyboardInterrupt:\n    print('interrupted', flush=True)\n"
              "    sys.exit(0)\nsys.exit(5)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    line = proc.stdout.readline()  # printed as soon as the call has unwound
    waited = time.perf_counter() - sent
    proc.communicate(timeout=60)
    return line.strip(), proc.returncode, waited
