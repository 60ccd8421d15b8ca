"""File lists (``RUN/heldout.txt``): one image per line, ``relative/path<TAB>class_index``.

Paths are relative to the dataset directory, so a list stays valid when the dataset moves with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..common import UserError, write_text_atomic

__all__ = ["Sample", "read_file_list", "write_file_list"]


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the dataset directory, e.g. "train/cat/001.png"
    target: int  # class index = position of the class folder name in sorted order


def write_file_list(path: str | os.PathLike[str], samples: Sequence[Sample]) -> None:
    """Write ``relative/path<TAB>target`` per line, atomically."""
    lines = []
    for s in samples:
        if any(ch in s.path for ch in "\t\n\r") or not s.path:
            raise UserError(f"{path}: cannot write sample path {s.path!r} (empty, or holds a tab or newline)")
        lines.append(f"{s.path}\t{int(s.target)}\n")
    write_text_atomic(path, "".join(lines))


def read_file_list(path: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> list[Sample]:
    """Read a file list written by ``write_file_list``; every path must be an existing file under data_dir."""
    path, data_dir = Path(path), Path(data_dir)
    if not path.is_file():
        raise UserError(f"file list not found: {path}")
    root = data_dir.resolve()
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0]:
            raise UserError(f"{path}:{lineno}: expected 'relative/path<TAB>class_index', got {line!r}")
        rel, tgt = fields
        try:
            target = int(tgt)
        except ValueError:
            target = -1
        if target < 0:
            raise UserError(f"{path}:{lineno}: class index must be an integer >= 0, got {tgt!r}")
        full = (data_dir / rel).resolve()
        if Path(rel).is_absolute() or not full.is_relative_to(root):
            raise UserError(
                f"{path}:{lineno}: path {rel!r} must be relative to the dataset directory {data_dir}"
            )
        if not full.is_file():
            raise UserError(f"{path}:{lineno}: {rel!r} does not exist under {data_dir}")
        out.append(Sample(rel, target))
    return out
