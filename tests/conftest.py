"""Session settings for the suite, which runs on pytest-xdist workers (``addopts`` in ``pyproject.toml``).

* A worker's share of the cores: torch, and every process a test starts, would otherwise each take all of them,
  and two workers' thread pools would fight over the same cores.
* Files with slow tests are handed out first (``--dist loadfile`` keeps the collection order): a long file
  started last would leave one worker alone at the end.
"""

import os
from collections import Counter

import pytest

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # before any test module imports torch, which reads it once
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: a file's tests keep their order
