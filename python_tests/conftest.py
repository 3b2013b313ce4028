import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_report_header(config):
    import spectral_ext

    return f"spectral_ext build: {spectral_ext.build_info()}"
