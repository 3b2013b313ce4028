import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_report_header(config):
    import spectral_ext

    return f"spectral_ext build: {spectral_ext.build_info()}"


def interrupted(script: str, delay: float = 1.0):
    """Run `script` in a subprocess that prints "ready", send it SIGINT `delay`
    seconds later and return (the next line it prints, its exit code, the
    seconds from the signal to that line): how long a native loop takes to
    honour Ctrl-C."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    line = proc.stdout.readline()  # printed as soon as the call has unwound
    waited = time.perf_counter() - sent
    proc.communicate(timeout=60)
    return line.strip(), proc.returncode, waited
