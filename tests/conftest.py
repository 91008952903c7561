"""Test-wide environment: quiet Ray, a persistent DeepSpeed extension cache, CPU DeepSpeed."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Every Ray cluster the tests start is local and bound to 127.0.0.1 (some call ray.init directly, not
# rlgen's init_ray, which sets this itself for a local cluster); never a cluster reachable from outside.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles a shared-memory op on first init (~40 s); keep it for the whole CI run.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and two busy-waiting OpenMP threads on a shared
    2-core machine run 10-100x slower; test modules opt in with usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Tiny random-weight SD3 and FLUX pipeline folders (real layouts and tokenizers), built once per
    session (~10 s): {"sd3": Path, "flux": Path}. Never committed: scripts/make_tiny_pipelines.py writes them."""
    import torch

    from rlgen.testing.tiny_pipelines import build_all

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_all(tmp_path_factory.mktemp("tiny_pipelines"))
    finally:
        torch.set_num_threads(before)


def pytest_runtest_setup(item):
    """CI runs the slow tests "while time allows": past RLGEN_TEST_DEADLINE (Unix seconds) every test not
    yet started is skipped with the reason, so a time budget ends the run cleanly instead of killing it."""
    deadline = os.environ.get("RLGEN_TEST_DEADLINE")
    if deadline:
        import time

        if time.time() > float(deadline):
            pytest.skip("CI time budget spent (RLGEN_TEST_DEADLINE)")
