import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
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
