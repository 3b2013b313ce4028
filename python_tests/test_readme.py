"""Every example of README.md runs as pasted (issue 18): a README example that
fails fails CI.

- Each ```python block runs as a script of its own, in a process of its own
  and a temporary folder, so a block must be self-contained (its imports, its
  tiny model and inputs). The test id names the block's section heading. The
  process is forked from one that has imported torch and spectral_ext once
  (seconds of CPU per block otherwise): a fresh interpreter in all but that.
- Each command line of a ```bash block (continuations joined) runs in a
  temporary folder that holds what the README's placeholders name:
  `checkpoints/` (three small digits CNNs, `cnn_00.pt` ...) and a package
  `mypackage.models:make_cnn`, and what a python block whose first line is
  `# writes ...` writes there (it runs first, as pasted). `spectral-ext` is the installed command when it
  sits beside this Python, else `python -m spectral_ext`. A line whose comment
  says `# illustrative` is shown, not run (multi-process or long commands).
- Other fences (plain ``` or ```console: the install commands that build the
  very package under test) are not run.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT_S = 600  # a hang guard; an example takes well under a minute on 2 idle cores, minutes on loaded ones
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks(text: str):
    """[(heading, language, first line number, code)] for every fenced block."""
    blocks, heading, lang, start, lines = [], "(top)", None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line.strip()) if line.startswith("```") else None
        if lang is None:
            if fence:
                lang, start, lines = fence.group(1).lower(), number + 1, []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.strip() == "```":
            blocks.append((heading, lang, start, "\n".join(lines) + "\n"))
            lang = None
        else:
            lines.append(line)
    if lang is not None:
        raise ValueError(f"README.md: the block opened at line {start - 1} is never closed")
    return blocks


def command_lines(code: str):
    """The commands of a bash block: continuations joined, blank and comment-only lines dropped."""
    commands, current = [], ""
    for line in code.splitlines():
        current += line.strip() if current else line.rstrip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append(current.strip())
        current = ""
    return commands


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def _cases(kind: str):
    """pytest params, named section-slug[-k] (k counts within the section, stable when others edit)."""
    cases, seen = [], {}
    for heading, lang, line, code in readme_blocks(README.read_text()):
        if kind == "python" and lang == "python":
            items = [code]
        elif kind == "bash" and lang in ("bash", "sh", "shell"):
            items = [c for c in command_lines(code) if "# illustrative" not in c]
        else:
            continue
        for item in items:
            name = _slug(heading)
            seen[name] = seen.get(name, 0) + 1
            cases.append(pytest.param(heading, line, item, id=name if seen[name] == 1 else f"{name}-{seen[name]}"))
    return cases


def _env(folder: pathlib.Path) -> dict:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    # This checkout's spectral_ext first (the tests' own), then the placeholders' package.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(folder)] +
                                        [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    installed = pathlib.Path(sys.executable).with_name("spectral-ext")
    shim = bin_dir / "spectral-ext"
    if not shim.exists():
        target = shlex.quote(str(installed)) if installed.exists() else f"{shlex.quote(sys.executable)} -m spectral_ext"
        shim.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        shim.chmod(0o755)
    env["PATH"] = os.pathsep.join([str(bin_dir), str(pathlib.Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _report(heading, line, what, result):
    tail = (result.stdout[-2000:] + "\n" + result.stderr[-4000:]).strip()
    return (f"README.md section '{heading}' (block at line {line}) failed with exit code {result.returncode}:\n"
            f"{what}\n--- output (tail) ---\n{tail}")


def _assert_runs(args, folder, heading, line, what, shell=False):
    try:
        result = subprocess.run(args, cwd=folder, env=_env(folder), capture_output=True, text=True,
                                timeout=TIMEOUT_S, shell=shell)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md section '{heading}' (block at line {line}) ran past {TIMEOUT_S} s:\n{what}")
    if result.returncode != 0:
        pytest.fail(_report(heading, line, what, result))
    return result


# The forking runner: one process imports what every block imports, then forks
# a child per block (nothing computed before the fork, so no thread pool is
# inherited). It reads one JSON job per line and answers the exit code.
_FORKSERVER = r"""
import json, os, runpy, sys, traceback
import torch, spectral_ext, matplotlib, pandas  # noqa: F401
try:
    import torchvision  # noqa: F401
except ImportError:
    pass
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.chdir(job["cwd"])
            os.environ.clear()
            os.environ.update(job["env"])
            sys.argv = [job["script"]]
            sys.path[0] = os.path.dirname(job["script"])
            runpy.run_path(job["script"], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class _Forker:
    """Runs scripts in children of one pre-imported interpreter (started on first use)."""

    def __init__(self):
        self.proc = None

    def run(self, script: pathlib.Path, folder: pathlib.Path, timeout: float) -> subprocess.CompletedProcess:
        import select

        env = _env(folder)
        if self.proc is None or self.proc.poll() is not None:
            # This checkout first, as in a block's own environment, but no block's folder on the path.
            path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
            self.proc = subprocess.Popen([sys.executable, "-c", _FORKSERVER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True,
                                         env=dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=path))
        out, err = folder / ".stdout", folder / ".stderr"
        job = {"script": str(script), "cwd": str(folder), "env": env, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.close()  # the child hangs: a fresh runner for the next block
            raise subprocess.TimeoutExpired(str(script), timeout)
        line = self.proc.stdout.readline()
        code = json.loads(line) if line else -1
        return subprocess.CompletedProcess([str(script)], code, out.read_text(), err.read_text())

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forker():
    runner = _Forker()
    yield runner
    runner.close()


def _assert_block_runs(forker, script, folder, heading, line, code):
    try:
        result = forker.run(script, folder, TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md section '{heading}' (block at line {line}) ran past {TIMEOUT_S} s:\n{code}")
    if result.returncode != 0:
        pytest.fail(_report(heading, line, code, result))
    return result


# ---------------------------------------------------------------- the machinery itself

def test_blocks_are_parsed_with_their_headings():
    text = "# A\n```python\nx = 1\n```\n## B\n```bash\nspectral-ext info \\\n  --x 1  # note\n# c\n```\n```\nmake\n```\n"
    blocks = readme_blocks(text)
    assert [(b[0], b[1], b[2]) for b in blocks] == [("A", "python", 3), ("B", "bash", 7), ("B", "", 12)]
    assert command_lines(blocks[1][3]) == ["spectral-ext info --x 1  # note"]
    with pytest.raises(ValueError, match="never closed"):
        readme_blocks("```python\nx = 1\n")


def test_readme_has_runnable_examples():
    assert len(_cases("python")) >= 5 and _cases("bash")


def test_a_failing_block_fails(tmp_path):
    # The runner reports a failure by section, rather than passing silently.
    with pytest.raises(pytest.fail.Exception, match="section 'Broken'"):
        _assert_runs([sys.executable, "-c", "raise SystemExit(3)"], tmp_path, "Broken", 1, "raise SystemExit(3)")


@pytest.mark.parametrize("code, expected", [("raise SystemExit(3)", "exit code 3"),
                                            ("import nonexistent_module_x", "No module named 'nonexistent_module_x'")])
def test_a_failing_forked_block_fails(forker, tmp_path, code, expected):
    # A forked block's exit code and traceback reach the report, and its output
    # and working folder are its own.
    script = tmp_path / "block.py"
    script.write_text(f"import os, sys\nprint('out', os.getcwd())\nprint('err', file=sys.stderr)\n{code}\n")
    with pytest.raises(pytest.fail.Exception, match="section 'Broken'") as failure:
        _assert_block_runs(forker, script, tmp_path, "Broken", 1, code)
    assert expected in str(failure.value) and f"out {tmp_path}" in str(failure.value)
    ok = tmp_path / "ok.py"
    ok.write_text("import os, sys, torch\nassert sys.argv == [__file__] and __name__ == '__main__'\n"
                  "assert sys.path[0] == os.path.dirname(__file__) and os.environ['MPLBACKEND'] == 'Agg'\n"
                  "print(torch.ones(2).sum())\n")
    assert "tensor(2.)" in _assert_block_runs(forker, ok, tmp_path, "Fine", 1, "").stdout


# ---------------------------------------------------------------- the README's examples

@pytest.mark.slow
@pytest.mark.parametrize("heading,line,code", _cases("python"))
def test_readme_python_block(forker, tmp_path, heading, line, code):
    script = tmp_path / "block.py"
    script.write_text(code)
    _assert_block_runs(forker, script, tmp_path, heading, line, code)


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    """A folder with what the README's commands name: checkpoints/ of a small
    digits CNN architecture mypackage.models:make_cnn."""
    import torch

    folder = tmp_path_factory.mktemp("readme_cli")
    package = folder / "mypackage"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(
        "from torch import nn\n\n\n"
        "def make_cnn():\n"
        "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),\n"
        "                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))\n")
    sys.path.insert(0, str(folder))
    try:
        from mypackage.models import make_cnn
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mypackage.models", None)
        sys.modules.pop("mypackage", None)
    (folder / "checkpoints").mkdir()
    for i in range(3):
        torch.manual_seed(i)
        torch.save(make_cnn().state_dict(), folder / "checkpoints" / f"cnn_{i:02d}.pt")
    # A python block that "writes" a folder for the commands below it runs here first, as pasted.
    for heading, lang, line, code in readme_blocks(README.read_text()):
        if lang == "python" and code.lstrip().startswith("# writes "):
            (folder / "writer.py").write_text(code)
            _assert_runs([sys.executable, "writer.py"], folder, heading, line, code)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("heading,line,command", _cases("bash"))
def test_readme_command_line(placeholders, heading, line, command):
    _assert_runs(command, placeholders, heading, line, command, shell=True)
