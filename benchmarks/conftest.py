"""pytest-benchmark fixtures: workload models built once per session, on the chosen device.

    pytest benchmarks/ --benchmark-only [--tbfast-device cpu|cuda|auto] [--tbfast-workloads a,b]
"""
import pytest
import torch

from tbfast.bench.workloads import QUICK_WORKLOADS, WORKLOADS


def pytest_addoption(parser):
    parser.addoption("--tbfast-device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="device of the tbfast benchmarks (auto: cuda when available)")
    parser.addoption("--tbfast-workloads", default=",".join(QUICK_WORKLOADS),
                     help=f"comma-separated workloads (known: {','.join(WORKLOADS)})")


def pytest_generate_tests(metafunc):
    if "workload" in metafunc.fixturenames:
        names = [w for w in metafunc.config.getoption("--tbfast-workloads").split(",") if w]
        metafunc.parametrize("workload", names)


@pytest.fixture(scope="session")
def device(pytestconfig):
    name = pytestconfig.getoption("--tbfast-device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--tbfast-device cuda but no CUDA device")
    return torch.device(name)


_MODELS = {}


@pytest.fixture
def model(workload, device):
    key = (workload, str(device))
    if key not in _MODELS:
        _MODELS.clear()  # one workload in memory at a time
        _MODELS[key] = WORKLOADS[workload].build(0).to(device)
    return _MODELS[key]
