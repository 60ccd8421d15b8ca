"""What several benchmarks share: the test fixtures (planted confusion matrices) from tests/fixtures.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the repository's tests/ folder

from fixtures import planted_confusion  # noqa: E402

__all__ = ["planted_confusion"]
