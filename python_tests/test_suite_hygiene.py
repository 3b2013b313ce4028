"""The suite itself: no test can hang.

Every wait on a subprocess, a thread or a process pool in the tests carries a
timeout, so a child that never stops fails its test instead of blocking CI (a
background job's children start with SIGINT ignored: see conftest.interrupted)."""
import ast
import pathlib

import pytest

TESTS = pathlib.Path(__file__).parent
# subprocess's blocking helpers, and the blocking methods of Popen, Thread, Process and futures
_BLOCKING_FUNCTIONS = {"run", "call", "check_call", "check_output"}
_BLOCKING_METHODS = {"wait", "communicate", "join", "result"}


def _unbounded_waits(source: str) -> list[int]:
    """Line numbers of blocking calls without a timeout in `source`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if any(k.arg == "timeout" for k in node.keywords):
            continue
        owner, name = node.func.value, node.func.attr
        if isinstance(owner, ast.Name) and owner.id == "subprocess" and name in _BLOCKING_FUNCTIONS:
            lines.append(node.lineno)
        elif name in _BLOCKING_METHODS and not node.args:
            # str.join always has an argument; a bare .join()/.wait()/.communicate() blocks for ever
            lines.append(node.lineno)
    return lines


def test_the_checker_finds_unbounded_waits():
    source = ("import subprocess\nsubprocess.run(['x'])\np = subprocess.Popen(['x'])\np.wait()\n"
              "p.communicate()\nt.join()\nsubprocess.run(['x'], timeout=5)\np.wait(timeout=1)\n"
              "', '.join(names)\nfuture.result()\n")
    assert _unbounded_waits(source) == [2, 4, 5, 6, 10]


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_every_wait_has_a_timeout(path):
    found = _unbounded_waits(path.read_text())
    assert not found, f"{path.name}: a wait without a timeout on line(s) {found}"


def test_ctrl_c_tests_pass_from_a_background_job():
    """A shell's background job (`make test &`, nohup) starts with SIGINT ignored and Python then
    installs no KeyboardInterrupt handler: conftest.interrupted's child must set one itself, or the
    Ctrl-C tests wait for ever on a loop that never stops."""
    import signal
    import subprocess
    import sys

    code = ("import signal, sys\nassert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
            f"sys.path.insert(0, {str(TESTS)!r})\nfrom conftest import interrupted\n"
            "print(interrupted('', 'se.sinkhorn(torch.rand(8, 8, dtype=torch.float64), iters=10**11)', "
            "delay=0.5, timeout=60)[:2])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "('interrupted', 0)"


def test_docs_resolve_inside_the_repository():
    """A user of the repository has no shared folder beside it: no path into one in the package, tests,
    benchmarks or README; papers are cited through docs/references.md."""
    root = TESTS.parent
    files = [root / "README.md", *root.joinpath("spectral_ext").rglob("*.py"), *TESTS.glob("*.py"),
             *root.joinpath("benchmarks").rglob("*.py"), *root.joinpath("scripts").glob("*.py")]
    marker = "../" + "shared"  # split so that this file does not match itself
    found = [str(path.relative_to(root)) for path in files if marker in path.read_text()]
    assert not found, f"paths into {marker}: {found}"
