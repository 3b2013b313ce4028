"""setup.py's choice of kernels and of the CUDA toolkit (issue 18), on fake
toolkits in a temporary folder, and what build_info() reports."""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import spectral_ext as se

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def setup_py(monkeypatch):
    for var in ("CUDA_HOME", "CUDA_PATH", "FORCE_CUDA"):
        monkeypatch.delenv(var, raising=False)
    spec = importlib.util.spec_from_file_location("spectral_ext_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() does not run
    return module


def fake_toolkit(folder: pathlib.Path) -> pathlib.Path:
    """A directory that looks like a CUDA toolkit; its nvcc's dry run names its bin as _HERE_."""
    (folder / "bin").mkdir(parents=True)
    (folder / "include").mkdir()
    (folder / "include" / "cuda_runtime.h").write_text("")
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _HERE_={folder / 'bin'}'\n")
    nvcc.chmod(0o755)
    return folder


def test_cuda_home_is_used_when_it_holds_a_toolkit(setup_py, tmp_path, monkeypatch):
    home = fake_toolkit(tmp_path / "cuda-13.0")
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert setup_py.find_cuda_home() == (str(home), f"CUDA_HOME={home}")


def test_a_cuda_home_without_a_toolkit_is_refused_by_name(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nothing"))
    home, why = setup_py.find_cuda_home()
    assert home is None and "CUDA_HOME=" in why and "no CUDA toolkit" in why
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("CUDA_PATH", str(tmp_path))
    assert setup_py.find_cuda_home()[0] is None


def test_a_wrapper_script_on_path_resolves_to_its_toolkit(setup_py, tmp_path):
    # /usr/local/bin/nvcc as a shell script `exec /usr/local/cuda-13.0/bin/nvcc "$@"`: torch would
    # guess /usr/local from it; the dry run names the real bin directory.
    home = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {home / "bin" / "nvcc"} "$@"\n')
    wrapper.chmod(0o755)
    assert setup_py._nvcc_home(str(wrapper)) == str(home)
    link = tmp_path / "link-nvcc"
    link.symlink_to(home / "bin" / "nvcc")
    assert setup_py._nvcc_home(str(link)) == str(home)
    lost = tmp_path / "lost" / "nvcc"
    lost.parent.mkdir()
    lost.write_text("#!/bin/sh\nexit 1\n")
    lost.chmod(0o755)
    assert setup_py._nvcc_home(str(lost)) is None


def test_force_cuda_decides(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("FORCE_CUDA", "0")
    assert setup_py.choose_backend()[:2] == (False, "FORCE_CUDA_0")
    monkeypatch.setenv("FORCE_CUDA", "1")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no toolkit there
    with pytest.raises(SystemExit, match="FORCE_CUDA=1 but"):
        setup_py.choose_backend()
    home = fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(home))
    if torch.version.cuda is None:
        with pytest.raises(SystemExit, match="CPU-only build"):
            setup_py.choose_backend()
    else:
        assert setup_py.choose_backend()[:2] == (True, "FORCE_CUDA_1")
        assert os.environ["CUDA_HOME"] == str(home)


def test_without_a_gpu_the_default_is_cpu_only(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "cuda")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    use_cuda, reason, message = setup_py.choose_backend()
    assert not use_cuda and reason == ("cpu_torch" if torch.version.cuda is None else "no_gpu")
    assert "FORCE_CUDA=1" in message or "CPU-only" in message


def test_build_info_says_which_and_why():
    info = se.build_info()
    assert not info["build_reason"].startswith("unknown"), info["build_reason"]
    assert info["build_reason"].startswith("CUDA kernels compiled" if info["cuda_compiled"] else "CPU kernels only")


def test_the_command_is_declared_and_runs():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, function = project["scripts"]["spectral-ext"].split(":")
    assert callable(getattr(importlib.import_module(module), function))
    # Every runtime dependency the package imports at top level is declared (scikit-learn for the demo).
    declared = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert {"torch", "numpy", "scipy", "pandas", "networkx", "matplotlib", "tqdm", "safetensors",
            "scikit-learn"} <= declared
    installed = pathlib.Path(sys.executable).with_name("spectral-ext")
    if installed.exists():  # after `make setup`
        result = subprocess.run([str(installed), "info"], capture_output=True, text=True, cwd="/", timeout=300)
        assert result.returncode == 0 and "build_reason" in result.stdout


def test_the_test_extra_installs_every_peer_the_compat_tests_compare_against():
    """pip install -e ".[test]" (the README's route) gets the peers at their pinned versions, so a compat
    test imports its peer (no importorskip: a missing peer fails the suite)."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = [line.strip() for line in (ROOT / "benchmarks" / "peers" / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert set(pins) <= set(extras["test"]) and set(pins) <= set(extras["bench"])
    skipped = [path.name for path in (ROOT / "python_tests").glob("test_compat_*.py")
               if re.search(r"importorskip\((\"|')(weightwatcher|ot|cka|torch_cka|rsatoolbox|repsim)",
                            path.read_text())]
    assert not skipped, f"compat tests that skip when their peer is missing: {skipped}"


def test_every_imported_package_is_declared():
    """Each third-party package imported anywhere in spectral_ext is a dependency or in an extra."""
    import ast

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    declared = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in requirements}
    distribution = {"sklearn": "scikit-learn", "mpl_toolkits": "matplotlib"}  # import name -> its distribution
    imported = set()
    for path in (ROOT / "spectral_ext").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported - set(sys.stdlib_module_names) if name not in ("spectral_ext", "__future__")}
    missing = {distribution.get(name, name) for name in third_party} - declared
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
