"""The two tiers of the suite (`tests/conftest.py`): a test is `slow` exactly when its fixtures include a full-size
fixture, and a test of the fast tier that builds a large model fails.

A small session of pytest runs in a subprocess on a module written here, with this suite's conftest and the memory
limit of the fast tier lowered to 64 MiB, so that 256 MiB stands for a full-size model.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import pytest_collection_modifyitems
from tests.helpers.peak_memory import PeakMemory

ROOT = Path(__file__).parents[1]

CONFTEST = """
import tests.conftest
from tests.conftest import *  # noqa: F403 (its hooks and fixtures)

tests.conftest.FAST_TIER_PEAK_LIMIT = 64 << 20


def pytest_collection_finish(session):
    print("slow:", *sorted(item.name for item in session.items if item.get_closest_marker("slow")))
"""

MODULE = """
import pytest
import torch

from tests.helpers.models import full_size_fixture

SIZE = (256 << 20) // 4


@full_size_fixture()
def large_model():
    return torch.ones(SIZE)


@pytest.fixture
def through_another(large_model):
    return large_model


def test_small():
    assert torch.ones(1000).sum() == 1000


def test_large_in_its_body():
    assert torch.ones(SIZE).sum() == SIZE


def test_large_from_a_fixture(large_model):
    assert large_model.sum() == SIZE


def test_large_through_another_fixture(through_another):
    assert through_another.sum() == SIZE
"""


def run_pytest(folder: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pytest", str(folder), "-p", "no:cacheprovider", "-q", *arguments]
    return subprocess.run(command, capture_output=True, text=True, cwd=folder, env=environment, timeout=600)


def test_peak_memory_sees_an_allocation() -> None:
    peak = PeakMemory()
    if not peak.available:
        return
    peak.start()
    large = torch.ones((128 << 20) // 4)
    assert peak.growth() >= 120 << 20
    del large
    peak.start()
    small = torch.ones(1000)
    assert peak.growth() < 32 << 20
    del small


def test_full_size_fixtures_mark_their_users_slow_and_the_fast_tier_builds_nothing_large(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_module.py").write_text(MODULE)
    result = run_pytest(tmp_path, "-rA", "-s")
    assert "slow: test_large_from_a_fixture test_large_through_another_fixture\n" in result.stdout, result.stdout
    assert "PASSED test_module.py::test_small" in result.stdout
    assert "PASSED test_module.py::test_large_from_a_fixture" in result.stdout  # slow: not checked
    assert "ERROR at teardown of test_large_in_its_body" in result.stdout
    assert "test_module.py::test_large_in_its_body is not slow but its peak memory grew by 0.3 GiB" in result.stdout
    assert "1 error" in result.stdout and result.returncode == 1


def test_a_slow_marker_by_hand_is_refused() -> None:
    class Item:
        nodeid, fixturenames = "test_module.py::test_x", ()

        def get_closest_marker(self, name: str) -> object:
            return pytest.mark.slow.mark if name == "slow" else None

    with pytest.raises(pytest.UsageError, match=r"marked slow by hand .*: test_module.py::test_x"):
        pytest_collection_modifyitems([Item()])  # type: ignore[list-item]
