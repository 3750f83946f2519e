import os

import pytest
import torch

# Triton kernels run on CPU through the interpreter; must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's `-n auto`), every worker gets its share of the cores for torch's intra-op threads:
# more threads than cores only spin-wait (these models are tiny), and the share is the same on every run.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (pytest marker `gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add overhead (and spin badly on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_tf32():
    """IEEE float32 on CUDA for comparisons against float64: cuBLAS and cuDNN default to TF32 on Ampere and later."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def pytest_runtest_logreport(report):
    """With ``VITPRUNE_FAST_TEST_LOG=path``, append every test outcome to a JSON-lines file as it happens, so a run
    stopped by a deadline (bench/gpu_tests.py on a time-limited GPU lease) still says what passed and failed."""
    path = os.environ.get("VITPRUNE_FAST_TEST_LOG")
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    import json

    outcome = "skipped" if report.skipped else "passed" if report.passed else "failed"
    message = "" if report.passed else str(report.longrepr).strip().splitlines()[-1][:500] if report.longrepr else ""
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "when": report.when, "outcome": outcome,
                            "seconds": round(report.duration, 3), "message": message}) + "\n")
