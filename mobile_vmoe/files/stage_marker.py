"""Pipeline stage markers, ``OUT/stages/<stage>.json``: written last, atomically, when a stage finished.

stage      the stage's name
seconds    how long it took
outputs    the files and folders it produced, relative to OUT: a marker vouches for them, so a stage
           whose outputs are gone is not done, whatever its marker says
result     the stage's summary (top-1, paths of artifacts, ...), for the report
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common import UserError, read_json, write_json_atomic

__all__ = ["StageMarker", "marker_path", "read_marker", "write_marker"]


@dataclass
class StageMarker:
    stage: str
    seconds: float
    outputs: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    def missing_outputs(self, out: Path) -> list[str]:
        return [o for o in self.outputs if not (out / o).exists()]


def marker_path(out: str | os.PathLike[str], stage: str) -> Path:
    return Path(out) / "stages" / f"{stage}.json"


def write_marker(out: str | os.PathLike[str], m: StageMarker) -> Path:
    p = marker_path(out, m.stage)
    write_json_atomic(p, {"stage": m.stage, "seconds": m.seconds, "outputs": m.outputs, "result": m.result})
    return p


def read_marker(out: str | os.PathLike[str], stage: str) -> StageMarker | None:
    """The stage's marker, or None when there is none. A marker that is not ours is a UserError."""
    p = marker_path(out, stage)
    if not p.is_file():
        return None
    obj = read_json(p, "stage marker")
    if not isinstance(obj, dict) or obj.get("stage") != stage or not isinstance(obj.get("outputs", []), list):
        raise UserError(
            f"{p}: not a stage marker of stage {stage!r} (expected stage, seconds, outputs, result)"
        )
    return StageMarker(
        stage=stage,
        seconds=float(obj.get("seconds") or 0.0),
        outputs=[str(o) for o in obj.get("outputs", [])],
        result=dict(obj.get("result") or {}),
    )
