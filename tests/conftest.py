import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


# Marker `peft_compat`: the tests that exercise PEFT, transformers or huggingface_hub (registration,
# add_weighted_adapter for every method, the file engine's parity with it, plain-PEFT reloads, the library's
# train/load/route/merge/Arrow). .ci/compat.sh runs them again in a virtual environment with the oldest PEFT and
# transformers that pyproject.toml allows. Every test file is marked except these (a new file is marked too).
NOT_PEFT_FACING = {
    "test_layout.py",  # parses the package's source
    "test_cp_math.py",  # the cp method on plain tensors against dense tensorly
    "test_quality_benchmark.py",  # the quality benchmark's own machinery
    "test_library_distributed.py",  # Accelerate's multi-process launch (same Accelerate in both environments)
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name not in NOT_PEFT_FACING:
            item.add_marker(pytest.mark.peft_compat)
    if config.getoption("--runslow") or os.environ.get("PEFT_CP_MERGE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or PEFT_CP_MERGE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def hub_offline(monkeypatch):
    """``HF_HUB_OFFLINE=1`` for one test (restored after it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
