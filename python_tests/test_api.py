"""The API's shared conventions: randomness as generator=, public names."""
import pytest
import torch

from spectral_ext import _checks


def test_generator_forms():
    assert _checks.generator(None) is None
    given = torch.Generator()
    assert _checks.generator(given) is given
    a, b = _checks.generator(7), _checks.generator(7)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    for bad in (True, 1.5, "7"):
        with pytest.raises(TypeError, match="generator must be"):
            _checks.generator(bad)


def test_public_names_resolve_and_methods_load_on_first_use():
    import inspect
    import subprocess
    import sys

    import spectral_ext as se

    for name in se.__all__:
        assert getattr(se, name) is not None, name
    assert set(se.__all__) <= set(dir(se))
    assert se.cka.__module__.startswith("spectral_ext.similarity") and inspect.isfunction(se.svr)
    assert se.spectral_neurons.internal_dimensions
    with pytest.raises(AttributeError, match="no attribute 'not_a_method'"):
        se.not_a_method
    # A fresh `import spectral_ext` loads the operators only: a CLI run pays for the methods it uses.
    script = ("import sys, spectral_ext\n"
              "print(sorted(m for m in ('scipy.stats', 'networkx', 'matplotlib', 'sklearn',"
              " 'spectral_ext.spectral_neurons',"
              " 'spectral_ext.similarity') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300).stdout
    assert loaded.strip() == "[]"


def test_first_tensor_reads_the_output_forms_layers_return():
    from types import SimpleNamespace

    from spectral_ext._hooks import first_tensor

    t = torch.ones(2)
    assert first_tensor(t) is t and first_tensor((t, None)) is t
    assert first_tensor(SimpleNamespace(last_hidden_state=t)) is t  # a Hugging Face model output
    with pytest.raises(TypeError, match="not a tensor"):
        first_tensor({"x": t})
