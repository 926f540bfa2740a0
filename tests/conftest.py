"""Shared fixtures: one tiny Qwen2.5-Omni checkpoint per test session, written by make-tiny."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # invariant 5: no network at test time
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU; the flag must be set before anything (torch,
    # transformers) imports triton, so here rather than in test_kernels.py.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Modules whose tests start processes (stage processes, a browser, the robot/simulator children, the
# CLI as a subprocess): `make test-fast` leaves them out (`-m "not slow and not process"`).
PROCESS_MODULES = {"test_runtime", "test_server_faults", "test_web", "test_robot", "test_robot_talk", "test_robot_io",
                   "test_nav_runner", "test_nav_sim", "test_server_abuse"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in PROCESS_MODULES:
            item.add_marker(pytest.mark.process)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from omnistream.random_checkpoints import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-omni"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The tiny checkpoint loaded through the same path as Qwen/Qwen2.5-Omni-7B."""
    from omnistream.checkpoints import load_omni

    return load_omni(tiny_dir)


@pytest.fixture(autouse=True)
def _denormals_restored():
    """The CLI flushes denormals process-wide (a CPU speed fix); tests that call ``cli.main`` in
    this process must not leave that on for later tests (hypothesis refuses to run without them)."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny DiT / BigVGAN (``pytestmark = usefixtures("one_thread")``),
    restored afterwards. Their ops take tens of microseconds; with two OpenMP threads on a busy 2-core
    box (other test processes running) each op waits on a descheduled peer and a forward slows ~40x
    (measured 19 ms -> 1.5 s), while one thread stays at ~35 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
